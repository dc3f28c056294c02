{{/* The sluice image: repository, then :tag, or @sha256:digest when the tag
is only a digest. */}}
{{- define "sluice.image" -}}
{{ .Values.image.repository }}{{ with .Values.image.tag }}{{ if hasPrefix "@" . }}{{ . }}{{ else }}:{{ . }}{{ end }}{{ end }}
{{- end -}}

{{/* The agent exempts its own namespace from redirection
(--exempt-namespaces): installed in "default", it would exempt every pod
there. */}}
{{- define "sluice.checkNamespace" -}}
{{- if eq .Release.Namespace "default" -}}
{{- fail "sluice exempts the namespace it runs in from redirection, so it must not run in \"default\": install it in a namespace of its own (helm install -n sluice-system)" -}}
{{- end -}}
{{- end -}}
