{{/* The chart name, or nameOverride. */}}
{{- define "trainyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: fullnameOverride, else release name + chart name. */}}
{{- define "trainyard.fullname" -}}
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

{{/* Labels that select the operator pods; never change them (Deployment selectors are immutable). */}}
{{- define "trainyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trainyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The recommended app.kubernetes.io labels of every resource. */}}
{{- define "trainyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "trainyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: trainyard
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "trainyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trainyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name the existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "true" when the operator serves every namespace (no watchNamespaces). */}}
{{- define "trainyard.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* "true" when replicas coordinate through kopf peering (more than one replica). */}}
{{- define "trainyard.peering" -}}
{{- if gt (int .Values.replicas) 1 }}true{{ end }}
{{- end }}

{{/* The flags of `trainyard operator` (operator/trainyard/cli/operator_cmd.py), one per line. */}}
{{- define "trainyard.args" -}}
{{- if include "trainyard.clusterWide" . }}
- --all-namespaces
{{- else }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- end }}
{{- if include "trainyard.peering" . }}
- --peering={{ .Values.peering.name }}
{{- else }}
- --standalone
{{- end }}
- --resync-seconds={{ .Values.resyncSeconds }}
- --metrics-port={{ ternary .Values.metrics.port -1 .Values.metrics.enabled }}
- --liveness=http://0.0.0.0:{{ .Values.health.port }}/healthz
{{- with .Values.trainerImage }}
- --trainer-image={{ . }}
{{- end }}
{{- with .Values.vllmImage }}
- --vllm-image={{ . }}
{{- end }}
{{- if eq .Values.logLevel "debug" }}
- --verbose
{{- end }}
{{- $owned := dict "-n" "watchNamespaces" "--namespace" "watchNamespaces" "-A" "watchNamespaces" "--all-namespaces" "watchNamespaces" "--standalone" "replicas" "--peering" "peering.name" "--priority" "replicas" "--resync-seconds" "resyncSeconds" "--metrics-port" "metrics" "--liveness" "health.port" "--trainer-image" "trainerImage" "--vllm-image" "vllmImage" "-v" "logLevel" "--verbose" "logLevel" }}
{{- range .Values.extraArgs }}
{{- $flag := regexReplaceAll "=.*" . "" }}
{{- if hasKey $owned $flag }}
{{- fail (printf "extraArgs: %s is set by the chart from %s; set that value instead" $flag (get $owned $flag)) }}
{{- end }}
- {{ . }}
{{- end }}
{{- end }}

{{/*
What the operator does in a namespace it serves, from its code: operator/trainyard/operator/k8s.py
(KubeClient, Informer, apply_plan) and controller.py (CHILD_KINDS, WATCHED_KINDS), plus kopf's own
needs (watching runs, posting Events). tests/chart/test_rbac.py checks these rules
against the code and against every request the operator makes in a run.
*/}}
{{- define "trainyard.namespacedRules" -}}
# The runs: kopf lists and watches them (its only handlers are event handlers, which write
# nothing to the runs: no finalizer, no annotations).
- apiGroups: [trainyard.dev]
  resources: [trainingruns]
  verbs: [list, watch]
# Status is computed whole and merge-patched once per change.
- apiGroups: [trainyard.dev]
  resources: [trainingruns/status]
  verbs: [patch]
# Children: created and deleted by the reconcile, followed through label-selected informers.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [create, delete, list, watch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, delete, list, watch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, delete, list, watch]
# InferenceServers (server_controller.py): kopf lists and watches them, the status is
# merge-patched; their Deployment and Service are replaced whole (PUT) when the model or
# the flags change.
- apiGroups: [trainyard.dev]
  resources: [inferenceservers]
  verbs: [list, watch]
- apiGroups: [trainyard.dev]
  resources: [inferenceservers/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [services]
  verbs: [update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [update]
# PromotionGates (gate_controller.py): kopf lists and watches them, the status is
# merge-patched; their evaluation ConfigMap and Job are created (and a running evaluation
# Job deleted when a person rejects the gate) under the configmaps and jobs rules above.
- apiGroups: [trainyard.dev]
  resources: [promotiongates]
  verbs: [list, watch]
- apiGroups: [trainyard.dev]
  resources: [promotiongates/status]
  verbs: [patch]
# TrainingPipelines (pipeline_controller.py): kopf lists and watches them, the status is
# merge-patched; each started stage's TrainingRun and PromotionGate are created (and
# deleted when a failed stage is retried); the serve stage's InferenceServer is created,
# and replaced whole (PUT) to roll a newly promoted model.
- apiGroups: [trainyard.dev]
  resources: [trainingpipelines]
  verbs: [list, watch]
- apiGroups: [trainyard.dev]
  resources: [trainingpipelines/status]
  verbs: [patch]
- apiGroups: [trainyard.dev]
  resources: [trainingruns, promotiongates, inferenceservers]
  verbs: [create, delete]
- apiGroups: [trainyard.dev]
  resources: [inferenceservers]
  verbs: [update]
# Worker pods: read only, for progress and failure reasons.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# kopf posts Events about handler failures.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* kopf peering: keep-alives into the peering object, watching the other replicas' (both kopf groups). */}}
{{- define "trainyard.peeringRule" -}}
# kopf peering: each replica keeps itself alive in the peering object and watches the others.
- apiGroups: [kopf.dev, zalando.org]
  resources: [{{ ternary "clusterkopfpeerings" "kopfpeerings" (eq (include "trainyard.clusterWide" .) "true") }}]
  verbs: [list, watch, patch]
{{- end }}

{{/* A PodMonitor's namespaceSelector: the watched namespaces, or every namespace. */}}
{{- define "trainyard.podMonitorNamespaces" -}}
namespaceSelector:
{{- if .Values.watchNamespaces }}
  matchNames:
  {{- toYaml .Values.watchNamespaces | nindent 4 }}
{{- else }}
  any: true
{{- end }}
{{- end }}

{{/* Relabelings of the PodMonitors: a fixed job, and the pod's Trainyard labels on every
series so dashboards join pod metrics to their run and pipeline
(operator/trainyard/observe/labels.py names the same). */}}
{{- define "trainyard.podMonitorRelabelings" -}}
- targetLabel: job
  replacement: {{ .job }}
- sourceLabels: [__meta_kubernetes_pod_label_trainyard_dev_run]
  targetLabel: run
- sourceLabels: [__meta_kubernetes_pod_label_trainyard_dev_pipeline]
  targetLabel: pipeline
- sourceLabels: [__meta_kubernetes_pod_label_trainyard_dev_attempt]
  targetLabel: attempt
- sourceLabels: [__meta_kubernetes_pod_label_trainyard_dev_server]
  targetLabel: server
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
  targetLabel: component
{{- end }}
