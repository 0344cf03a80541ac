module github.com/otomato-gh/birdwatch/hack/tools/istio

go 1.24.0

require istio.io/api v1.28.0
