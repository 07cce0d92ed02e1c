{{- define "patchscope.name" -}}{{ .Release.Name }}{{- end -}}

{{- define "patchscope.labels" -}}
app.kubernetes.io/name: patchscope
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "patchscope.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag }}{{- end -}}

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
      limits: {{ toJson .Values.limits }}
      batching: {{ toJson .Values.batching }}
    deployments:
      - name: SourceModel
        num_replicas: {{ .Values.source.replicas }}
        max_ongoing_requests: {{ .Values.source.maxOngoingRequests }}
        ray_actor_options: {num_cpus: {{ .Values.source.cpusPerReplica }}, num_gpus: {{ .Values.source.gpusPerReplica }}}
      - name: TargetModel
        max_ongoing_requests: {{ .Values.target.maxOngoingRequests }}
        graceful_shutdown_timeout_s: {{ .Values.gracefulShutdownSeconds }}
        {{- if eq (int .Values.target.minReplicas) (int .Values.target.maxReplicas) }}
        num_replicas: {{ .Values.target.minReplicas }}
        {{- else }}
        autoscaling_config: {min_replicas: {{ .Values.target.minReplicas }}, max_replicas: {{ .Values.target.maxReplicas }}, target_ongoing_requests: {{ .Values.target.targetOngoingRequests }}}
        {{- end }}
        ray_actor_options: {num_cpus: {{ .Values.target.cpusPerReplica }}, num_gpus: {{ .Values.target.gpusPerReplica }}}
      - name: Explainer
        num_replicas: {{ .Values.explainer.replicas }}
        max_ongoing_requests: {{ .Values.explainer.maxOngoingRequests }}
        graceful_shutdown_timeout_s: {{ .Values.gracefulShutdownSeconds }}
        ray_actor_options: {num_cpus: {{ .Values.explainer.cpusPerReplica }}}
{{- end -}}

{{- define "patchscope.volumes" -}}
- name: models
  persistentVolumeClaim: {claimName: {{ include "patchscope.name" . }}-models, readOnly: true}
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
