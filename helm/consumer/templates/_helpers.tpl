{{/*
Names, labels and the per-handler view of the values. Every template that
renders one object per handler calls "consumer.handlerContext" and reads the
merged values from its result.
*/}}

{{- define "consumer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "consumer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "consumer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "consumer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "consumer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "consumer.labels" -}}
helm.sh/chart: {{ include "consumer.chart" . }}
{{ include "consumer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "consumer.name" . }}
{{- end }}

{{/* Selector of one handler's pods. Takes a handler context. */}}
{{- define "consumer.handlerSelectorLabels" -}}
{{ include "consumer.selectorLabels" .root }}
app.kubernetes.io/component: worker
handler: {{ .handler.name }}
{{- end }}

{{- define "consumer.handlerLabels" -}}
{{ include "consumer.labels" .root }}
app.kubernetes.io/component: worker
handler: {{ .handler.name }}
{{- end }}

{{- define "consumer.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "consumer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "consumer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "consumer.secretName" -}}
{{- default (include "consumer.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
The handler context as YAML: the handler entry, its resource name and every
value a handler may override, resolved against the top-level default. Use:
  {{- $ctx := include "consumer.handlerContext" (dict "root" $ "handler" $handler) | fromYaml }}
  {{- $_ := set $ctx "root" $ }}
The `root` key cannot go through YAML, so the caller sets it afterwards.
*/}}
{{- define "consumer.handlerContext" -}}
{{- $root := .root }}
{{- $handler := .handler }}
{{- $values := $root.Values }}
{{- $ctx := dict "handler" $handler }}
{{- $_ := set $ctx "fullname" (printf "%s-%s" (include "consumer.fullname" $root) $handler.name) }}
{{- range $key := list "resources" "terminationGracePeriodSeconds" "nodeSelector" "tolerations" "affinity" "topologySpreadConstraints" "priorityClassName" }}
{{- $_ := set $ctx $key (ternary (get $handler $key) (get $values $key) (hasKey $handler $key)) }}
{{- end }}
{{- $_ := set $ctx "podAnnotations" (merge (dict) ($handler.podAnnotations | default dict) $values.podAnnotations) }}
{{- $_ := set $ctx "podLabels" (merge (dict) ($handler.podLabels | default dict) $values.podLabels) }}
{{- $_ := set $ctx "replicas" (ternary $handler.replicas 1 (hasKey $handler "replicas")) }}
{{- range $key := list "autoscaling" "podDisruptionBudget" }}
{{- $merged := deepCopy (get $values $key) }}
{{- range $field, $value := (get $handler $key | default dict) }}
{{- $_ := set $merged $field $value }}
{{- end }}
{{- $_ := set $ctx $key $merged }}
{{- end }}
{{- $_ := set $ctx "config" (include "consumer.handlerConfig" (dict "root" $root "handler" $handler) | fromYaml) }}
{{- toYaml $ctx }}
{{- end }}

{{/*
The handler's settings: top-level `config` with the handler's `config`
applied field by field, then `topics` and `groupId`. Field by field, and not
with `merge`, because `merge` treats false and 0 as missing.
*/}}
{{- define "consumer.handlerConfig" -}}
{{- $config := deepCopy .root.Values.config }}
{{- range $group, $fields := (.handler.config | default dict) }}
{{- if kindIs "map" $fields }}
{{- $target := get $config $group | default dict }}
{{- range $field, $value := $fields }}
{{- $_ := set $target $field $value }}
{{- end }}
{{- $_ := set $config $group $target }}
{{- else }}
{{- $_ := set $config $group $fields }}
{{- end }}
{{- end }}
{{- $kafka := get $config "kafka" | default dict }}
{{- if .handler.topics }}
{{- $_ := set $kafka "topics" .handler.topics }}
{{- end }}
{{- if .handler.groupId }}
{{- $_ := set $kafka "group_id" .handler.groupId }}
{{- end }}
{{- $_ := set $config "kafka" $kafka }}
{{- toYaml $config }}
{{- end }}

{{/*
Settings as environment variables: config.<group>.<field> becomes
CONSUMER_<GROUP>__<FIELD>, and a top-level field becomes CONSUMER_<FIELD>.
Unset (null or empty) values are left out so the application default applies.
Renders a YAML map of name to string.
*/}}
{{- define "consumer.settingsEnv" -}}
{{- $env := dict }}
{{- range $group, $fields := . }}
{{- if kindIs "map" $fields }}
{{- range $field, $value := $fields }}
{{- $text := include "consumer.envValue" $value }}
{{- if $text }}
{{- $_ := set $env (printf "CONSUMER_%s__%s" (upper $group) (upper $field)) $text }}
{{- end }}
{{- end }}
{{- else }}
{{- $text := include "consumer.envValue" $fields }}
{{- if $text }}
{{- $_ := set $env (printf "CONSUMER_%s" (upper $group)) $text }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/*
One value as the string the settings parser expects. YAML numbers arrive as
float64, so whole numbers are printed without a fraction or an exponent
(1000000, not 1e+06).
*/}}
{{- define "consumer.envValue" -}}
{{- if kindIs "invalid" . }}
{{- else if kindIs "slice" . }}
{{- join "," . }}
{{- else if kindIs "float64" . }}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Secret-backed settings as container env entries. Takes (dict "root" $ "config"
$config "skip" $names), and optionally "secretName" to read another Secret.
Entries named in "skip" are left out because the user's env sets them.
*/}}
{{- define "consumer.secretEnv" -}}
{{- $values := .root.Values }}
{{- $secretName := .secretName | default (include "consumer.secretName" .root) }}
{{- $external := ne $values.secrets.existingSecret "" }}
{{- $kafka := .config.kafka | default dict }}
{{- $entries := list }}
{{- $entries = append $entries (dict "name" "CONSUMER_POSTGRES__DSN" "key" $values.secrets.keys.postgresDsn "wanted" true "optional" false) }}
{{- $entries = append $entries (dict "name" "CONSUMER_KAFKA__SASL_PASSWORD" "key" $values.secrets.keys.kafkaSaslPassword "wanted" (ternary (not (empty $kafka.sasl_mechanism)) (ne $values.secrets.kafkaSaslPassword "") $external) "optional" false) }}
{{- $entries = append $entries (dict "name" "CONSUMER_KAFKA__SSL_KEY_PASSWORD" "key" $values.secrets.keys.kafkaSslKeyPassword "wanted" (ternary (not (empty $kafka.ssl_keyfile)) (ne $values.secrets.kafkaSslKeyPassword "") $external) "optional" $external) }}
{{- range $entries }}
{{- if and .wanted (not (has .name $.skip)) }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names of the env entries in a list, so chart defaults never duplicate a user's entry. */}}
{{- define "consumer.envNames" -}}
{{- $names := list }}
{{- range . }}
{{- $names = append $names .name }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* Volumes shared by the handler pods and the migration Job. */}}
{{- define "consumer.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "consumer.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Map of kafka.sasl_mechanism to the `sasl` parameter of the KEDA Kafka scaler. */}}
{{- define "consumer.kedaSasl" -}}
{{- $mechanisms := dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512" }}
{{- get $mechanisms (toString .) }}
{{- end }}

{{/* Keys of the chart-created Secret; shared by the release Secret and the migration hook's copy. */}}
{{- define "consumer.secretData" -}}
{{- $secrets := .Values.secrets }}
{{ $secrets.keys.postgresDsn }}: {{ $secrets.postgresDsn | quote }}
{{- with $secrets.kafkaSaslPassword }}
{{ $secrets.keys.kafkaSaslPassword }}: {{ . | quote }}
{{- end }}
{{- with $secrets.kafkaSslKeyPassword }}
{{ $secrets.keys.kafkaSslKeyPassword }}: {{ . | quote }}
{{- end }}
{{- end }}
