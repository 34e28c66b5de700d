{{/*
Names, labels and per-component settings shared by every template.
"streamprov.components" describes the two services (name, command, ports and state_dir taken from
the topic-level config, so the chart and the services always agree); their chart settings are
.Values.validator and .Values.recomputeManager.
*/}}

{{- define "streamprov.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "streamprov.fullname" -}}
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

{{- define "streamprov.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "streamprov.labels" -}}
helm.sh/chart: {{ include "streamprov.chart" . }}
app.kubernetes.io/name: {{ include "streamprov.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streamprov
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "streamprov.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamprov.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "streamprov.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "streamprov.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "streamprov.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The two services, with their settings from values and from the topic-level config. */}}
{{- define "streamprov.components" -}}
{{- $config := .Values.config | default dict -}}
{{- $validator := index $config "validator" | default dict -}}
{{- $recompute := index $config "recompute_manager" | default dict -}}
validator:
  name: validator
  command: validator
  httpPort: {{ index $validator "http_port" | default 8080 | int }}
  metricsPort: {{ index $validator "metrics_port" | default 9464 | int }}
  stateDir: {{ index $validator "state_dir" | default "/var/lib/streamprov/validator" | quote }}
recomputeManager:
  name: recompute-manager
  command: recompute-manager
  httpPort: {{ index $recompute "http_port" | default 8081 | int }}
  metricsPort: {{ index $recompute "metrics_port" | default 9465 | int }}
  stateDir: {{ index $recompute "state_dir" | default "/var/lib/streamprov/recompute" | quote }}
{{- end -}}

{{- define "streamprov.componentLabels" -}}
{{ include "streamprov.labels" .root }}
app.kubernetes.io/component: {{ .component.name }}
{{- end -}}

{{- define "streamprov.componentSelectorLabels" -}}
{{ include "streamprov.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component.name }}
{{- end -}}

{{/*
Refuse secrets in .Values.config: the config becomes a ConfigMap, readable by anyone who can read
ConfigMaps. Passwords come from Secrets (kafkaSecrets.*) as mounted files.
*/}}
{{- define "streamprov.checkNoSecretsInConfig" -}}
{{- $kafka := .Values.config.kafka | default dict -}}
{{- $sasl := $kafka.sasl | default dict -}}
{{- $ssl := $kafka.ssl | default dict -}}
{{- if hasKey $sasl "password" -}}
{{- fail "config.kafka.sasl.password would be stored in a ConfigMap: put the password in a Secret and set kafkaSecrets.sasl.existingSecret (and passwordKey) instead" -}}
{{- end -}}
{{- if hasKey $ssl "key_password" -}}
{{- fail "config.kafka.ssl.key_password would be stored in a ConfigMap: put it in a Secret and set kafkaSecrets.tls.existingSecret and keyPasswordKey instead" -}}
{{- end -}}
{{- range $key, $_ := ($kafka.client | default dict) -}}
{{- $lower := lower $key -}}
{{- if or (contains "password" $lower) (contains "secret" $lower) (contains "token" $lower) (contains "jaas" $lower) (contains "key.pem" $lower) (contains "credential" $lower) (contains "oauthbearer.config" $lower) -}}
{{- fail (printf "config.kafka.client.%s looks like a secret and would be stored in a ConfigMap: pass it from a Secret with %s.extraEnv (name: STREAMPROV__KAFKA__CLIENT__%s, valueFrom.secretKeyRef) instead" $key "validator/recomputeManager" (upper $key)) -}}
{{- end -}}
{{- end -}}
{{- $telemetry := .Values.config.telemetry | default dict -}}
{{- $otlp := $telemetry.otlp | default dict -}}
{{- if $otlp.headers -}}
{{- fail "config.telemetry.otlp.headers would be stored in a ConfigMap: put each value in a Secret, pass it with validator/recomputeManager.extraEnv (valueFrom.secretKeyRef) and name that variable in config.telemetry.otlp.headers_env instead" -}}
{{- end -}}
{{- $keys := (.Values.config.signing | default dict).keys | default dict -}}
{{- range $i, $k := .Values.signingSecrets.keys -}}
{{- $declared := index $keys $k.keyId -}}
{{- if not $declared -}}
{{- fail (printf "signingSecrets.keys[%d].keyId %s is not a key of config.signing.keys: declare it there (with its algorithm) first" $i $k.keyId) -}}
{{- end -}}
{{- if and (eq ($declared.algorithm | toString) "hmac") (not $k.secretKey) -}}
{{- fail (printf "signingSecrets.keys[%d] (%s) is an hmac key: set secretKey, the Secret's key holding the shared secret" $i $k.keyId) -}}
{{- end -}}
{{- if and (eq ($declared.algorithm | toString) "ed25519") (not (or $k.privateKeyKey $k.publicKeyKey)) -}}
{{- fail (printf "signingSecrets.keys[%d] (%s) is an ed25519 key: set privateKeyKey (to sign) and/or publicKeyKey (to verify)" $i $k.keyId) -}}
{{- end -}}
{{- if and (eq ($declared.algorithm | toString) "hmac") (or $k.privateKeyKey $k.publicKeyKey) -}}
{{- fail (printf "signingSecrets.keys[%d] (%s) is an hmac key: privateKeyKey and publicKeyKey are for ed25519 keys" $i $k.keyId) -}}
{{- end -}}
{{- if and (eq ($declared.algorithm | toString) "ed25519") $k.secretKey -}}
{{- fail (printf "signingSecrets.keys[%d] (%s) is an ed25519 key: secretKey is for hmac keys" $i $k.keyId) -}}
{{- end -}}
{{- end -}}
{{- $protocol := $kafka.security_protocol | default "PLAINTEXT" -}}
{{- if and .Values.kafkaSecrets.sasl.existingSecret (not (hasPrefix "SASL_" $protocol)) -}}
{{- fail (printf "kafkaSecrets.sasl.existingSecret is set but config.kafka.security_protocol is %s: use SASL_SSL (or SASL_PLAINTEXT)" $protocol) -}}
{{- end -}}
{{- if and .Values.kafkaSecrets.tls.existingSecret (not (has $protocol (list "SSL" "SASL_SSL"))) -}}
{{- fail (printf "kafkaSecrets.tls.existingSecret is set but config.kafka.security_protocol is %s: use SSL or SASL_SSL" $protocol) -}}
{{- end -}}
{{- end -}}
