{{/*
One backend Deployment. Args: root, component, spec (its values), image (values.image.<x>),
command (list, or empty for the image's own), port (0: no HTTP, no probes), redisRole, models.
*/}}
{{- define "lssa.backendDeployment" -}}
{{- $root := .root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "lssa.componentName" . }}
  labels:
    {{- include "lssa.labels" . | nindent 4 }}
spec:
  replicas: {{ .spec.replicas }}
  selector:
    matchLabels:
      {{- include "lssa.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "lssa.selectorLabels" . | nindent 8 }}
      annotations:
        # A changed Secret made by the chart rolls the pods (env is read once at start).
        checksum/secrets: {{ include (print $root.Template.BasePath "/secrets.yaml") $root | sha256sum }}
    spec:
      {{- with $root.Values.image.pullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.common.podSecurityContext | nindent 8 }}
      {{- with .spec.terminationGracePeriodSeconds }}
      terminationGracePeriodSeconds: {{ . }}
      {{- end }}
      {{- with include "lssa.scheduling" . | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ printf "%s:%s" .image.repository .image.tag | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          {{- with .command }}
          command:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- if .port }}
          ports:
            - name: http
              containerPort: {{ .port }}
              protocol: TCP
          {{- end }}
          env:
            {{- include "lssa.backendEnv" . | trim | nindent 12 }}
          {{- if .port }}
          startupProbe:
            {{- include "lssa.healthProbe" (dict "port" .port "probe" .spec.probes.startup) | nindent 12 }}
          readinessProbe:
            {{- include "lssa.healthProbe" (dict "port" .port "probe" .spec.probes.readiness) | nindent 12 }}
          livenessProbe:
            {{- include "lssa.healthProbe" (dict "port" .port "probe" .spec.probes.liveness) | nindent 12 }}
          {{- end }}
          resources:
            {{- include "lssa.resources" .spec | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.common.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: run
              mountPath: /app/run
            {{- if .models }}
            - name: models
              mountPath: {{ $root.Values.models.mountPath }}
            {{- end }}
            {{- with .spec.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        # The image cache and other scratch files (IMAGE_CACHE_DIR=/app/run/image-cache).
        - name: run
          emptyDir: {}
        {{- if .models }}
        - name: models
          persistentVolumeClaim:
            claimName: {{ default (include "lssa.componentName" (dict "root" $root "component" "models")) $root.Values.models.existingClaim }}
        {{- end }}
        {{- with .spec.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}
