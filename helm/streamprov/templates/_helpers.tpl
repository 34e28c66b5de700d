{{/*
Names, labels and per-component settings shared by every template.
"streamprov.components" describes the four services (name, command line, ports and state_dir taken
from the topic-level config, so the chart and the services always agree); their chart settings are
.Values.validator, .Values.recomputeManager, .Values.changes and .Values.sequencer.
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

{{/*
The four services, with their settings from values and from the topic-level config. args is the
container's command line; metricsPort 0: no metrics port; stateDir "": no state volume; signs: which
Ed25519 private keys the pods get ("records": every signingSecrets key except the ledger's checkpoint
key; "checkpoints": that key only; "": none).
*/}}
{{- define "streamprov.components" -}}
{{- $config := .Values.config | default dict -}}
{{- $validator := index $config "validator" | default dict -}}
{{- $recompute := index $config "recompute_manager" | default dict -}}
{{- $changes := index $config "changes" | default dict -}}
{{- $ledger := index $config "ledger" | default dict -}}
{{- $sequencer := index $ledger "sequencer" | default dict -}}
{{- $path := "/etc/streamprov/streamprov.yaml" -}}
validator:
  name: validator
  kind: Deployment
  args: ["validator", "run", "--config", {{ $path | quote }}]
  httpPort: {{ index $validator "http_port" | default 8080 | int }}
  metricsPort: {{ index $validator "metrics_port" | default 9464 | int }}
  stateDir: {{ index $validator "state_dir" | default "/var/lib/streamprov/validator" | quote }}
  signs: ""
recomputeManager:
  name: recompute-manager
  # a StatefulSet: stable pod names are its replica ids (see deployments.yaml)
  kind: StatefulSet
  args: ["recompute-manager", "run", "--config", {{ $path | quote }}]
  httpPort: {{ index $recompute "http_port" | default 8081 | int }}
  metricsPort: {{ index $recompute "metrics_port" | default 9465 | int }}
  stateDir: {{ index $recompute "state_dir" | default "/var/lib/streamprov/recompute" | quote }}
  signs: records
changes:
  name: change-detector
  kind: Deployment
  args:
    - changes
    - run
    - --config
    - {{ $path | quote }}
    {{- with (.Values.changes | default dict).functions }}
    - --functions
    - {{ . | quote }}
    {{- end }}
  httpPort: {{ index $changes "http_port" | default 8082 | int }}
  metricsPort: 0
  stateDir: {{ index $changes "state_dir" | default "/var/lib/streamprov/changes" | quote }}
  signs: ""
sequencer:
  name: ledger-sequencer
  kind: Deployment
  args:
    - ledger
    - sequencer
    - --config
    - {{ $path | quote }}
    {{- if not (index $ledger "checkpoint_key") }}
    # No config.ledger.checkpoint_key: a chain without signed checkpoints, said explicitly.
    - --unsigned
    {{- end }}
  httpPort: {{ index $sequencer "http_port" | default 8083 | int }}
  metricsPort: 0
  stateDir: ""
  signs: checkpoints
{{- end -}}

{{/* The ledger's checkpoint key id ("" when checkpoints are unsigned). */}}
{{- define "streamprov.checkpointKey" -}}
{{- (.Values.config.ledger | default dict).checkpoint_key | default "" | toString -}}
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
{{- fail (printf "config.kafka.client.%s looks like a secret and would be stored in a ConfigMap: pass it from a Secret with <service>.extraEnv (validator, recomputeManager, changes, sequencer; name: STREAMPROV__KAFKA__CLIENT__%s, valueFrom.secretKeyRef) instead" $key (upper $key)) -}}
{{- end -}}
{{- end -}}
{{- $telemetry := .Values.config.telemetry | default dict -}}
{{- $otlp := $telemetry.otlp | default dict -}}
{{- if $otlp.headers -}}
{{- fail "config.telemetry.otlp.headers would be stored in a ConfigMap: put each value in a Secret, pass it with <service>.extraEnv (validator, recomputeManager, changes, sequencer; valueFrom.secretKeyRef) and name that variable in config.telemetry.otlp.headers_env instead" -}}
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

{{/*
Refuse settings of the services that cannot work together: where the Ed25519 private keys go (the
ledger's checkpoint key only to the sequencer, other keys only to the Recompute Manager; the other
pods need each key's public half, since every service loads every key at start), an OTLP header
variable some service's pods lack (every service resolves them at start), and a persistent state
volume for more than one change detector.
*/}}
{{- define "streamprov.checkServices" -}}
{{- $config := .Values.config | default dict -}}
{{- $keys := ($config.signing | default dict).keys | default dict -}}
{{- $checkpoint := include "streamprov.checkpointKey" . -}}
{{- $secrets := dict -}}
{{- range $k := .Values.signingSecrets.keys -}}
{{- $_ := set $secrets $k.keyId $k -}}
{{- end -}}
{{- if $checkpoint -}}
{{- $declared := index $keys $checkpoint -}}
{{- if not $declared -}}
{{- fail (printf "config.ledger.checkpoint_key %s is not a key of config.signing.keys: declare it there (algorithm: ed25519) first" $checkpoint) -}}
{{- end -}}
{{- if ne ($declared.algorithm | toString) "ed25519" -}}
{{- fail (printf "config.ledger.checkpoint_key %s is an %s key: checkpoints need an ed25519 key (auditors verify them with its public key alone)" $checkpoint ($declared.algorithm | toString)) -}}
{{- end -}}
{{- $recordKeys := list -}}
{{- with (($config.defaults | default dict).signing | default dict).key -}}
{{- $recordKeys = append $recordKeys (list "config.defaults.signing.key" .) -}}
{{- end -}}
{{- range $topic, $t := ($config.topics | default dict) -}}
{{- with (($t | default dict).signing | default dict).key -}}
{{- $recordKeys = append $recordKeys (list (printf "config.topics.%s.signing.key" $topic) .) -}}
{{- end -}}
{{- end -}}
{{- range $recordKeys -}}
{{- if eq (index . 1 | toString) $checkpoint -}}
{{- fail (printf "%s is %s, the ledger's checkpoint key (config.ledger.checkpoint_key): its private key is mounted only in the ledger sequencer, so the Recompute Manager could not sign records with it; sign records with another key" (index . 0) $checkpoint) -}}
{{- end -}}
{{- end -}}
{{- if .Values.sequencer.enabled -}}
{{- $secret := index $secrets $checkpoint | default dict -}}
{{- if not (or $secret.privateKeyKey $declared.private_key_file $declared.private_key_env) -}}
{{- fail (printf "config.ledger.checkpoint_key is %s but the ledger sequencer gets no private key to sign checkpoints with: add it to signingSecrets.keys with privateKeyKey (mounted in the sequencer pods only)" $checkpoint) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $kid, $declared := $keys -}}
{{- $declared = $declared | default dict -}}
{{- $secret := index $secrets $kid | default dict -}}
{{- if and (eq ($declared.algorithm | toString) "ed25519") $secret.privateKeyKey (not (or $secret.publicKeyKey $declared.public_key $declared.public_key_file)) -}}
{{- $where := ternary "the ledger sequencer" "the Recompute Manager" (eq $kid $checkpoint) -}}
{{- fail (printf "signingSecrets: the ed25519 key %s has a privateKeyKey but no public key: its private key goes only to %s, and the other services load every key of config.signing.keys at start (they verify with it); set publicKeyKey too" $kid $where) -}}
{{- end -}}
{{- end -}}
{{- $otlp := ($config.telemetry | default dict).otlp | default dict -}}
{{- range $header, $var := ($otlp.headers_env | default dict) -}}
{{- range $key := list "validator" "recomputeManager" "changes" "sequencer" -}}
{{- $v := index $.Values $key -}}
{{- if $v.enabled -}}
{{- $found := false -}}
{{- range $e := ($v.extraEnv | default list) -}}
{{- if eq ($e.name | toString) ($var | toString) -}}
{{- $found = true -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "config.telemetry.otlp.headers_env.%s names the variable %s, but %s.extraEnv does not set it: every service reads the OTLP headers at start and would exit; add it (valueFrom.secretKeyRef) to each enabled service's extraEnv" $header ($var | toString) $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $changes := .Values.changes -}}
{{- if and $changes.enabled $changes.persistence.enabled (gt (int $changes.replicas) 1) -}}
{{- fail (printf "changes.persistence.enabled with changes.replicas %d: one claim holds one detector's RocksDB state (locked by its process); use one replica, or the default emptyDir with more" (int $changes.replicas)) -}}
{{- end -}}
{{- end -}}
