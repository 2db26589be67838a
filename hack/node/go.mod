// kubelet and kube-proxy at the control plane's pinned Kubernetes, for the test cluster's real node.
// go.work joins this module with ../k8s, so the staging modules' replace directives stay in one place
// (../k8s/go.mod) and the control plane's build key is unchanged by the node.
module kubellm.io/hack/node

go 1.26.0

require k8s.io/kubernetes v1.37.2
