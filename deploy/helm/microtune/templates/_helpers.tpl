{{- define "microtune.name" -}}{{ .Chart.Name }}{{- end -}}
{{- define "microtune.fullname" -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "microtune.labels" -}}
app.kubernetes.io/name: {{ include "microtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "microtune.selector" -}}
app.kubernetes.io/name: {{ include "microtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
