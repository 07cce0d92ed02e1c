{{- define "patchscope.name" -}}{{ .Release.Name }}{{- end -}}

{{- define "patchscope.labels" -}}
app.kubernetes.io/name: patchscope
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels that select this release's pods (NetworkPolicy, PodMonitor, affinity): stable across upgrades. */}}
{{- define "patchscope.selector" -}}
app.kubernetes.io/name: patchscope
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "patchscope.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag }}{{- end -}}

{{- define "patchscope.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "patchscope.name" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "patchscope.claimName" -}}
{{- default (printf "%s-models" (include "patchscope.name" .)) .Values.storage.existingClaim -}}
{{- end -}}

{{/* Pod-level settings every pod of the release shares. */}}
{{- define "patchscope.podCommon" -}}
serviceAccountName: {{ include "patchscope.serviceAccountName" . }}
securityContext: {{ toJson .Values.podSecurityContext }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets: {{ toJson . }}
{{- end }}
{{- end -}}

{{/* Scheduling of one pod kind: nodeSelector, tolerations and affinity from a values block. */}}
{{- define "patchscope.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector: {{ toJson . }}
{{- end }}
{{- with .tolerations }}
tolerations: {{ toJson . }}
{{- end }}
{{- with .affinity }}
affinity: {{ toJson . }}
{{- end }}
{{- end -}}

{{/* The preparation, as one shell script: models converted, cross-model maps fitted, then a marker written.
     Its checksum names the marker (and the Job), so Ray pods wait for this exact preparation. */}}
{{- define "patchscope.prepareScript" -}}
patchscope prepare {{ join " " (concat .Values.sources .Values.targets | uniq) }}
{{- if .Values.prepare.fit.enabled }}
{{- $pairs := list }}
{{- range $source := .Values.sources }}{{ range $target := $.Values.targets }}{{ if ne $source $target }}
{{- $pairs = append $pairs (list $source $target) }}
{{- end }}{{ end }}{{ end }}
{{- if $pairs }}
# The corpus: prepare.corpus.path, else the WikiText-2 slice packaged in the image (no ConfigMap: 1 MiB limit).
CORPUS={{ .Values.prepare.corpus.path | quote }}
[ -n "$CORPUS" ] || CORPUS="$(python -c 'from patchscope.data import data_root; print(data_root() / "wikitext-2" / "valid.txt")')"
{{- range $pairs }}
patchscope fit-mapping --source {{ index . 0 }} --target {{ index . 1 }} --pairs {{ $.Values.prepare.fit.pairs }} --method {{ $.Values.prepare.fit.method }} --max-words {{ int $.Values.prepare.fit.maxWords }} --corpus "$CORPUS" --if-missing
{{- end }}
{{- end }}
{{- end }}
mkdir -p /models/.prepared && touch /models/.prepared/{{ include "patchscope.prepareChecksum" . }}
{{- end -}}

{{- define "patchscope.prepareChecksum" -}}
{{- list .Values.sources .Values.targets .Values.models .Values.prepare.fit .Values.prepare.corpus.path | toJson | sha256sum | trunc 12 -}}
{{- end -}}

{{/* Before Ray starts in a pod: with a PVC, wait for the prepare Job's marker (the volume is read-only
     here); with an emptyDir, prepare into it. */}}
{{- define "patchscope.initContainers" -}}
- name: models
  image: {{ include "patchscope.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["sh", "-ec"]
  {{- if eq .Values.storage.mode "emptyDir" }}
  args:
    - |
      {{- include "patchscope.prepareScript" . | nindent 6 }}
  env:
    - {name: PATCHSCOPE_HOME, value: /models}
  resources: {{ toJson .Values.prepare.resources }}
  volumeMounts:
    - {name: models, mountPath: /models}
  {{- else }}
  args:
    - |
      until [ -f /models/.prepared/{{ include "patchscope.prepareChecksum" . }} ]; do
        echo "waiting for the prepare Job ({{ include "patchscope.name" . }}-prepare-{{ include "patchscope.prepareChecksum" . }}) to fill /models"; sleep 10
      done
  resources: {requests: {cpu: 10m, memory: 32Mi}, limits: {memory: 64Mi}}
  volumeMounts:
    - {name: models, mountPath: /models, readOnly: true}
  {{- end }}
  {{- with .Values.containerSecurityContext }}
  securityContext: {{ toJson . }}
  {{- end }}
{{- end -}}

{{- define "patchscope.env" -}}
- {name: PATCHSCOPE_HOME, value: /models}
- {name: RAY_ENABLE_ZERO_COPY_TORCH_TENSORS, value: "1"}
- {name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, value: {{ add .Values.limits.max_activation_bytes 1048576 | quote }}}
{{- end -}}

{{/* One Serve deployment's scaling: a fixed count when min == max, else Serve's autoscaling. */}}
{{- define "patchscope.scaling" -}}
{{- if eq (int .minReplicas) (int .maxReplicas) }}
num_replicas: {{ .minReplicas }}
{{- else }}
autoscaling_config: {min_replicas: {{ .minReplicas }}, max_replicas: {{ .maxReplicas }}, target_ongoing_requests: {{ .targetOngoingRequests }}}
{{- end }}
{{- end -}}

{{/* The Serve config (what deploy/config/gpu.yaml holds), built from values. */}}
{{- define "patchscope.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.ports.http }}
grpc_options:
  port: {{ .Values.ports.grpc }}
  grpc_servicer_functions:
    - patchscope.serve.proxy.add_patchscope_servicer
    - patchscope.serve.health.add_health_servicer
logging_config:
  encoding: JSON
  log_level: INFO
applications:
  - name: patchscope
    route_prefix: /
    import_path: patchscope.serve.app:build_app
    args:
      sources: {{ toJson .Values.sources }}
      targets: {{ toJson .Values.targets }}
      models: {{ toJson .Values.models }}
      dtype: {{ .Values.dtype }}
      device: auto
      torch_threads: null
      auth:
        required: {{ .Values.auth.required }}
        {{- if .Values.auth.required }}
        tokens_file: /etc/patchscope/tokens
        {{- end }}
      quotas: {{ toJson .Values.quotas }}
      limits: {{ toJson .Values.limits }}
      batching: {{ toJson .Values.batching }}
    deployments:
      - name: SourceModel
        max_ongoing_requests: {{ .Values.source.maxOngoingRequests }}
        max_surge_percent: {{ .Values.upgrade.maxSurgePercent }}
        {{- include "patchscope.scaling" .Values.source | nindent 8 }}
        ray_actor_options: {num_cpus: {{ .Values.source.cpusPerReplica }}, num_gpus: {{ .Values.source.gpusPerReplica }}}
      - name: TargetModel
        max_ongoing_requests: {{ .Values.target.maxOngoingRequests }}
        max_surge_percent: {{ .Values.upgrade.maxSurgePercent }}
        graceful_shutdown_timeout_s: {{ .Values.gracefulShutdownSeconds }}
        {{- include "patchscope.scaling" .Values.target | nindent 8 }}
        ray_actor_options: {num_cpus: {{ .Values.target.cpusPerReplica }}, num_gpus: {{ .Values.target.gpusPerReplica }}}
      - name: Explainer
        num_replicas: {{ .Values.explainer.replicas }}
        max_ongoing_requests: {{ .Values.explainer.maxOngoingRequests }}
        max_surge_percent: {{ .Values.upgrade.maxSurgePercent }}
        graceful_shutdown_timeout_s: {{ .Values.gracefulShutdownSeconds }}
        ray_actor_options: {num_cpus: {{ .Values.explainer.cpusPerReplica }}}
{{- end -}}

{{- define "patchscope.volumes" -}}
- name: models
  {{- if eq .Values.storage.mode "emptyDir" }}
  emptyDir: {{ toJson (dict "sizeLimit" .Values.storage.size) }}
  {{- else }}
  persistentVolumeClaim: {claimName: {{ include "patchscope.claimName" . }}, readOnly: true}
  {{- end }}
{{- if .Values.auth.required }}
- name: tokens
  secret: {secretName: {{ .Values.auth.existingSecret }}}
{{- end }}
{{- end -}}

{{- define "patchscope.mounts" -}}
- {name: models, mountPath: /models, readOnly: true}
{{- if .Values.auth.required }}
- {name: tokens, mountPath: /etc/patchscope, readOnly: true}
{{- end }}
{{- end -}}
