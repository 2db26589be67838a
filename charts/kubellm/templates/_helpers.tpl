{{/* The chart's name, or nameOverride. */}}
{{- define "kubellm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: fullnameOverride, else RELEASE-kubellm (just RELEASE when it already says kubellm). */}}
{{- define "kubellm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of the operator's pods: stable across upgrades. */}}
{{- define "kubellm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubellm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of every object the chart renders. */}}
{{- define "kubellm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubellm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubellm
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubellm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubellm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubellm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubellm.runtimeImage" -}}
{{- $img := .Values.operator.runtimeImage -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* Cluster-wide mode when no namespace is named. */}}
{{- define "kubellm.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{ end -}}
{{- end -}}

{{/* The headless Service naming every gateway pod (the operator reads each one's held requests). */}}
{{- define "kubellm.gatewayPodsService" -}}
{{- printf "%s-gateway-pods" (include "kubellm.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* Selector labels of the gateway's pods. */}}
{{- define "kubellm.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "kubellm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "kubellm.gatewayLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubellm.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubellm
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
