{{/* The sluice image: repository, and :tag when there is one. */}}
{{- define "sluice.image" -}}
{{ .Values.image.repository }}{{ with .Values.image.tag }}:{{ . }}{{ end }}
{{- end -}}
