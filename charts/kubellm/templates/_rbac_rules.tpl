{{/* Rules on cluster-scoped resources (a ClusterRole in both modes). */}}
{{- define "kubellm.clusterScopedRules" -}}
# kopf: watch CRDs to notice the LLMDeployment CRD being (re)installed or upgraded.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if include "kubellm.clusterWide" . }}
{{- if .Values.peering.enabled }}
# kopf peering, cluster-wide: read the peers' keep-alives and publish ours; loop.py reads it (get) to know
# whether this replica's fleet loop may act.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- else }}
# kopf, namespaced mode: follow the watched namespaces as they come and go (cluster-wide mode never lists them).
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end -}}

{{/* Rules on namespaced resources: in the ClusterRole (cluster-wide mode) or a Role per watched namespace. */}}
{{- define "kubellm.namespacedRules" -}}
# kopf (handlers.py): watch LLMDeployments; patch them for the progress annotations. apply.py Kube.get_llmd: the
# drift handler asks whether the owner of a deleted child still exists before re-creating the child.
- apiGroups: ["kubellm.io"]
  resources: ["llmdeployments"]
  verbs: ["get", "list", "watch", "patch"]
# kopf (handlers.py): conditions, replicas, metrics and scaling decisions in status.
- apiGroups: ["kubellm.io"]
  resources: ["llmdeployments/status"]
  verbs: ["patch"]
# apply.py Kube.scale_if: the autoscaler writes spec.replicas through the scale subresource, conditional on the
# resourceVersion it observed; after a conflict it reads the scale again.
- apiGroups: ["kubellm.io"]
  resources: ["llmdeployments/scale"]
  verbs: ["get", "patch"]
# OwnerReferencesPermissionEnforcement (on in OpenShift): the children's blockOwnerDeletion owner references
# need `update` on the owner's finalizers subresource, and their ownerReferences `delete` on each child kind.
- apiGroups: ["kubellm.io"]
  resources: ["llmdeployments/finalizers"]
  verbs: ["update"]
# apply.py Kube.apply: server-side apply of what render.py renders (an apply that creates the object needs
# `create` as well as `patch`; owner references need `delete`); handlers.py watches them all for drift.
# reconcile.py prunes (Kube.delete_owned reads the object first) the Deployment, the replica groups'
# StatefulSets and their headless Services when the replicas switch between pods and groups or scale down.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# model_cache.py: storage.modelCache's claim and its loader Job (pruned when the source changes or the cache goes);
# handlers.py indexes the Jobs and reconciles when one completes.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# apply.py Kube.apply; Kube.delete_owned when replicas drop to one (it reads the owner first); handlers.py indexes
# the PDBs by watch to know when there is one to prune.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# handlers.py: the pods index (readiness, Pending for GPUs, the IPs to scrape). loop.py restart_groups: a
# multi-node replica group's pods are annotated with the rank 0 they joined, and deleted to restart the group.
# loop.py observe_model: a loader pod's last log line is its download's progress.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# kopf.event (scaling decisions) and kopf's own warnings.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and .Values.peering.enabled (not (include "kubellm.clusterWide" .)) }}
# kopf peering, namespaced mode: read the peers' keep-alives and publish ours; loop.py reads them (get).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}
