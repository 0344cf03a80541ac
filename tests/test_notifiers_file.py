"""The notifiers file as birdwatch reads it at start: every type, the defaults, and every mistake it refuses with
one sentence that names the notifier and the field, never a credential."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from birdwatch.cli import build_parser
from birdwatch.config import settings_from
from birdwatch.errors import ConfigError
from birdwatch.notifiers.settings import DEFAULT_MOMENTS, load_file
from birdwatch.notify import Moment
from process import run_cli

SECRET_URL = "https://hooks.example.com/services/T000/B000/verySECRETwebhookTOKEN"


def write(folder: Path, notifiers: list[dict[str, Any]] | Any) -> str:
    path = folder / "notifiers.yaml"
    path.write_text(yaml.safe_dump({"notifiers": notifiers} if isinstance(notifiers, list) else notifiers))
    return str(path)


def secret(folder: Path, name: str, value: str) -> str:
    path = folder / name
    path.write_text(value + "\n")
    return str(path)


def test_every_type_with_its_fields_and_the_defaults(tmp_path: Path) -> None:
    url = secret(tmp_path, "url", SECRET_URL)
    path = write(
        tmp_path,
        [
            {"name": "deploys", "type": "slack", "token_file": secret(tmp_path, "token", "xoxb-1")},
            {"name": "teams", "type": "teams", "url_file": url, "moments": ["promoted", "rolled_back"]},
            {"name": "discord", "type": "discord", "url_file": url, "namespaces": ["shop"]},
            {"name": "gchat", "type": "googlechat", "url_file": url, "moments": "all"},
            {"name": "mm", "type": "mattermost", "url_file": url, "channel": "releases"},
            {"name": "rc", "type": "rocketchat", "url_file": url, "retries": 0, "timeout": 2.5},
            {"name": "hook", "type": "webhook", "url": "https://ci.example.com/bw", "queue_size": 5},
            {
                "name": "mail",
                "type": "email",
                "host": "smtp.example.com",
                "username": "bw",
                "password_file": secret(tmp_path, "pw", "hunter2"),
                "from": "bw@example.com",
                "to": "team@example.com",
            },
        ],
    )
    slack, teams, discord, gchat, mm, rc, hook, mail = load_file(path)
    assert (slack.token, slack.channel, slack.moments) == ("xoxb-1", "deployment", DEFAULT_MOMENTS)
    assert Moment.STEP not in DEFAULT_MOMENTS
    assert Moment.CHECK_FAILED not in DEFAULT_MOMENTS
    assert teams.url == SECRET_URL
    assert teams.moments == {Moment.PROMOTED, Moment.ROLLED_BACK}
    assert discord.wants(Moment.PROMOTED, "shop")
    assert not discord.wants(Moment.PROMOTED, "other")
    assert not discord.wants(Moment.STEP, "shop")
    assert gchat.moments == frozenset(Moment)
    assert mm.channel == "releases"
    assert (rc.retries, rc.timeout, rc.queue_size) == (0, 2.5, 1000)
    assert (hook.url, hook.secret, hook.queue_size) == ("https://ci.example.com/bw", None, 5)
    assert mail.smtp is not None
    assert (mail.smtp.port, mail.smtp.security, mail.smtp.password, mail.to) == (
        587,
        "starttls",
        "hunter2",
        ("team@example.com",),
    )
    for parsed in (slack, teams, mail):
        assert "xoxb-1" not in repr(parsed)
        assert "SECRET" not in repr(parsed)
        assert "hunter2" not in repr(parsed)


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ({"name": "Bad_Name", "type": "slack"}, "'name' must be a lower-case DNS label"),
        ({"name": "x", "type": "pager"}, "'type' must be one of slack, teams"),
        ({"name": "x", "type": "slack"}, "(x): 'token_file' is required"),
        ({"name": "x", "type": "slack", "token_file": "/nonexistent/token"}, "token_file /nonexistent/token"),
        ({"name": "x", "type": "teams"}, "give exactly one of 'url' and 'url_file'"),
        ({"name": "x", "type": "teams", "url": "ftp://x", "colour": "red"}, "unknown field(s) for type teams: colour"),
        ({"name": "x", "type": "webhook", "url": "https://a", "moments": ["promoted", "won"]}, "'moments' must be"),
        ({"name": "x", "type": "webhook", "url": "https://a", "namespaces": []}, "'namespaces' must be a non-empty"),
        ({"name": "x", "type": "webhook", "url": "https://a", "retries": -1}, "'retries' must be an integer >= 0"),
        ({"name": "x", "type": "webhook", "url": "https://a", "timeout": 0}, "'timeout' must be a positive"),
        ({"name": "x", "type": "email", "host": "h", "from": "a@b"}, "needs 'host', 'from' and 'to'"),
        ({"name": "x", "type": "email", "host": "h", "from": "a", "to": "b", "security": "ssl"}, "'security' must"),
    ],
)
def test_mistakes_are_refused_with_the_notifier_and_the_field(tmp_path: Path, item: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_file(write(tmp_path, [item]))
    assert says in str(refused.value)


def test_a_webhook_url_from_a_file_is_checked_but_never_shown(tmp_path: Path) -> None:
    bad = secret(tmp_path, "url", "hooks.example.com/verySECRETwebhookTOKEN")  # no scheme
    with pytest.raises(ConfigError) as refused:
        load_file(write(tmp_path, [{"name": "t", "type": "teams", "url_file": bad}]))
    assert "must be an http:// or https:// URL" in str(refused.value)
    assert "SECRET" not in str(refused.value)
    empty = secret(tmp_path, "empty", "")
    with pytest.raises(ConfigError, match="is empty"):
        load_file(write(tmp_path, [{"name": "t", "type": "teams", "url_file": empty}]))


def test_the_file_itself_must_be_a_list_of_notifiers_with_names_used_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping with a list 'notifiers'"):
        load_file(write(tmp_path, {"notifier": []}))
    item = {"name": "a", "type": "webhook", "url": "https://x"}
    with pytest.raises(ConfigError, match="used twice: a"):
        load_file(write(tmp_path, [item, item]))
    with pytest.raises(ConfigError, match="No such file"):
        load_file(str(tmp_path / "missing.yaml"))


def settings(argv: list[str], env: dict[str, str]) -> Any:
    return settings_from(build_parser(env).parse_args(["run", *argv]), env)


def test_todays_slack_settings_are_the_notifier_named_slack(tmp_path: Path) -> None:
    env = {"SLACK_API_TOKEN": "xoxb-legacy", "SLACK_CHANNEL": "releases"}
    [slack] = settings([], env).notifiers
    assert (slack.name, slack.type, slack.token, slack.channel) == ("slack", "slack", "xoxb-legacy", "releases")
    assert slack.moments == DEFAULT_MOMENTS
    assert settings([], {}).notifiers == ()
    path = write(tmp_path, [{"name": "hook", "type": "webhook", "url": "https://x"}])
    names = [n.name for n in settings(["--notifiers-file", path], env).notifiers]
    assert names == ["slack", "hook"]
    assert [n.name for n in settings([], {**env, "BIRDWATCH_NOTIFIERS_FILE": path}).notifiers] == names
    clash = write(tmp_path, [{"name": "slack", "type": "webhook", "url": "https://x"}])
    with pytest.raises(ConfigError, match="keep one of them"):
        settings(["--notifiers-file", clash], env)


def test_a_bad_notifiers_file_stops_birdwatch_at_start_with_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, [{"name": "t", "type": "teams", "url": SECRET_URL, "url_file": "/x"}])
    done = run_cli(["run", "--log-format", "console", "--notifiers-file", path])
    assert done.code == 2, done
    assert "give exactly one of 'url' and 'url_file'" in done.stderr + done.stdout
    assert "SECRET" not in done.stderr + done.stdout


def test_deploy_mounts_the_notifiers_file_where_birdwatch_reads_it(tmp_path: Path) -> None:
    deploy = Path(__file__).parent.parent / "deploy"
    [configmap] = yaml.safe_load_all((deploy / "notifiers.yaml").read_text())
    assert (configmap["kind"], configmap["metadata"]["name"]) == ("ConfigMap", "birdwatch-notifiers")
    assert "notifiers.yaml" in (deploy / "Kustomization").read_text()
    pod = yaml.safe_load((deploy / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["notifiers"]["configMap"]["name"] == "birdwatch-notifiers"
    assert env["BIRDWATCH_NOTIFIERS_FILE"] == f"{mounts['notifiers']}/notifiers.yaml"
    assert volumes["notifier-secrets"]["secret"] == {"secretName": "birdwatch-notifier-secrets", "optional": True}
    assert mounts["notifier-secrets"] == "/etc/birdwatch/notifier-secrets"
    # What the ConfigMap holds is a notifiers file birdwatch accepts, and so is every example in its comment.
    local = tmp_path / "notifiers.yaml"
    local.write_text(configmap["data"]["notifiers.yaml"])
    assert load_file(str(local)) == ()
    text = (deploy / "notifiers.yaml").read_text()
    example = "\n".join(line[3:] for line in text.splitlines() if line.startswith("#   ") or line == "#")
    example = example[example.index("notifiers:") :]
    raw = yaml.safe_load(example)
    for item in raw["notifiers"]:
        for key in [k for k in item if k.endswith("_file")]:
            item[key] = secret(tmp_path, f"{item['name']}-{key}", "https://example.com/x" if "url" in key else "s")
    assert [n.type for n in load_file(write(tmp_path, raw["notifiers"]))] == ["slack", "teams", "webhook"]
