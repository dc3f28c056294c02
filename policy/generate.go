package policy

// The API types in apis/policy/v1alpha1 are the source; everything below is
// generated from them and committed. `make generate` reruns it, `make
// verify` fails when the committed output is stale.
//
// controller-gen: the deepcopy functions and the CRD manifests, with the
// OpenAPI schema and CEL rules of the types' markers.
//go:generate go tool controller-gen object paths=./apis/...
//go:generate go tool controller-gen crd paths=./apis/... output:crd:artifacts:config=../daemonset/crds
//
// code-generator, as sample-controller uses it: the typed clientset, listers
// and shared informers.
//go:generate go tool client-gen --clientset-name versioned --input-base "" --input github.com/sluice-io/sluice/policy/apis/policy/v1alpha1 --output-pkg github.com/sluice-io/sluice/policy/client/clientset --output-dir ./client/clientset --go-header-file ./apis/boilerplate.go.txt
//go:generate go tool lister-gen --output-pkg github.com/sluice-io/sluice/policy/client/listers --output-dir ./client/listers --go-header-file ./apis/boilerplate.go.txt github.com/sluice-io/sluice/policy/apis/policy/v1alpha1
//go:generate go tool informer-gen --versioned-clientset-package github.com/sluice-io/sluice/policy/client/clientset/versioned --listers-package github.com/sluice-io/sluice/policy/client/listers --output-pkg github.com/sluice-io/sluice/policy/client/informers --output-dir ./client/informers --go-header-file ./apis/boilerplate.go.txt github.com/sluice-io/sluice/policy/apis/policy/v1alpha1
