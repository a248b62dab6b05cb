{{/* Names: <release>-<chart> (or fullnameOverride), then -<component>; 63 characters at most. */}}
{{- define "lssa.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lssa.componentName" -}}
{{- printf "%s-%s" (include "lssa.fullname" .root) .component -}}
{{- end -}}

{{- define "lssa.selectorLabels" -}}
app.kubernetes.io/name: {{ default .root.Chart.Name .root.Values.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "lssa.labels" -}}
{{ include "lssa.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "lssa.fullname" .root }}
{{- end -}}

{{/* The Secret the backends read: the admin's own, or the one this chart makes from values. */}}
{{- define "lssa.secretName" -}}
{{- with .Values.secrets -}}
{{- if .existingSecret -}}
{{- .existingSecret -}}
{{- else if or .labelStudioApiKey .basicAuthUser .basicAuthPass .redisPassword -}}
{{- printf "%s-secrets" (include "lssa.fullname" $) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* redis://[:$(REDIS_PASSWORD)@]host:6379/0 of one Redis role ("cache" or "queue"). */}}
{{- define "lssa.redisUrl" -}}
{{- $role := index .root.Values.redis .role -}}
{{- if $role.enabled -}}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" .root.Values.redis.auth.enabled -}}
{{- printf "redis://%s%s:6379/0" $auth (include "lssa.componentName" (dict "root" .root "component" (printf "redis-%s" .role))) -}}
{{- else -}}
{{- $role.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Environment of every backend container. Args: root, spec (the component's values), redisRole. */}}
{{- define "lssa.backendEnv" -}}
{{- $root := .root -}}
{{- $secret := include "lssa.secretName" $root -}}
{{- if $root.Values.labelStudio.url }}
- name: LABEL_STUDIO_URL
  value: {{ $root.Values.labelStudio.url | quote }}
{{- end }}
{{- if $secret }}
{{- range $key := list "LABEL_STUDIO_API_KEY" "BASIC_AUTH_USER" "BASIC_AUTH_PASS" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end }}
{{- if $root.Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.auth.enabled needs secrets.existingSecret (key REDIS_PASSWORD) or secrets.redisPassword" $secret }}
      key: REDIS_PASSWORD
{{- end }}
{{- $redisUrl := include "lssa.redisUrl" (dict "root" $root "role" .redisRole) }}
{{- if $redisUrl }}
- name: REDIS_URL
  value: {{ $redisUrl | quote }}
{{- end }}
- name: DEVICE
  value: {{ ternary "cuda" $root.Values.common.device (gt (int .spec.gpu) 0) | quote }}
- name: LOG_LEVEL
  value: {{ $root.Values.common.logLevel | quote }}
{{- if .models }}
- name: MODEL_DIR
  value: {{ $root.Values.models.mountPath | quote }}
{{- end }}
{{- range $key, $value := merge (deepCopy (default (dict) .spec.env)) (default (dict) $root.Values.common.env) }}
- name: {{ $key }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Resources, with nvidia.com/gpu in requests and limits (extended resources need both equal). */}}
{{- define "lssa.resources" -}}
{{- $resources := deepCopy (default (dict) .resources) -}}
{{- if gt (int .gpu) 0 -}}
{{- range $kind := list "requests" "limits" -}}
{{- $entries := default (dict) (index $resources $kind) -}}
{{- $_ := set $entries "nvidia.com/gpu" (int $.gpu) -}}
{{- $_ := set $resources $kind $entries -}}
{{- end -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
GET /health on the container's own port, as an exec probe: with basic auth on, /health asks for
it too, and an httpGet probe could only carry the password written into the manifest.
*/}}
{{- define "lssa.healthProbe" -}}
exec:
  command:
    - python
    - -c
    - {{ printf "import base64,os,urllib.request as r;u=os.environ.get('BASIC_AUTH_USER','');h={'Authorization':'Basic '+base64.b64encode((u+':'+os.environ.get('BASIC_AUTH_PASS','')).encode()).decode()} if u else {};r.urlopen(r.Request('http://127.0.0.1:%d/health',headers=h),timeout=%d)" (int .port) (int .probe.timeoutSeconds) | quote }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ add1 .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* Scheduling shared by every pod: node selector, tolerations, affinity, spread over nodes. */}}
{{- define "lssa.scheduling" -}}
{{- with .spec.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .spec.topologySpread }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "lssa.selectorLabels" . | nindent 8 }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget for one component. */}}
{{- define "lssa.pdb" -}}
{{- if .spec.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "lssa.componentName" . }}
  labels:
    {{- include "lssa.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .spec.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "lssa.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}
