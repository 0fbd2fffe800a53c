{{- define "faastube.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "faastube.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: faastube
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "faastube.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "faastube.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "faastube.operatorName" -}}
{{- printf "%s-operator" (include "faastube.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "faastube.sidecarName" -}}
{{- printf "%s-sidecar" (include "faastube.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "faastube.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- /*
A Kubernetes quantity (8Gi, 512Mi, 1.5G, 1073741824) as a whole number of bytes.
*/}}
{{- define "faastube.bytes" -}}
{{- $q := toString . | trim -}}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$" $q) -}}
{{- fail (printf "%q is not a memory quantity (e.g. 8Gi, 512Mi)" $q) -}}
{{- end -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $scale := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- printf "%.0f" (mulf (float64 $number) (index $scale (trimPrefix $number $q))) -}}
{{- end -}}

{{- /*
The sidecar's memory limit. Host pool slabs are pinned (cudaHostRegister) by the sidecar,
so their pages are charged to its memory cgroup: the limit must cover hostPoolMax plus the
sidecar's own memory (memoryHeadroom), or the kernel OOM-kills it as the pool grows.
Unset: exactly that sum; set: checked against it.
*/}}
{{- define "faastube.sidecarMemoryLimit" -}}
{{- $pool := include "faastube.bytes" .Values.sidecar.hostPoolMax | float64 -}}
{{- $need := addf $pool (include "faastube.bytes" .Values.sidecar.memoryHeadroom | float64) -}}
{{- $given := dig "limits" "memory" "" (.Values.sidecar.resources | default dict) -}}
{{- if $given -}}
{{- if lt (include "faastube.bytes" $given | float64) $need -}}
{{- fail (printf "sidecar.resources.limits.memory (%v) must cover sidecar.hostPoolMax (%v) plus sidecar.memoryHeadroom (%v): the pinned host pool is charged to the sidecar's memory cgroup" $given .Values.sidecar.hostPoolMax .Values.sidecar.memoryHeadroom) -}}
{{- end -}}
{{- $given -}}
{{- else -}}
{{- printf "%.0fMi" (ceil (divf $need 1048576.0)) -}}
{{- end -}}
{{- end -}}

{{- /*
The RuntimeClass of GPU function pods: functions.runtimeClassName when set ("" for none),
else the NVIDIA runtime for the envvar exposure and none for the CDI ones.
*/}}
{{- define "faastube.gpuRuntimeClass" -}}
{{- $rc := .Values.functions.runtimeClassName -}}
{{- if kindIs "invalid" $rc -}}
{{- if eq .Values.sidecar.devicePlugin.gpuExposure "envvar" -}}{{ .Values.sidecar.nvidia.runtimeClassName }}{{- end -}}
{{- else -}}
{{- $rc -}}
{{- end -}}
{{- end -}}

{{- /*
The operator's flags for the pods it builds (included in operator.yaml's args).
*/}}
{{- define "faastube.operatorPodArgs" -}}
{{- $args := list -}}
{{- with include "faastube.gpuRuntimeClass" . -}}
{{- $args = append $args (printf "--gpu-runtime-class=%s" .) -}}
{{- end -}}
{{- $args = append $args (printf "--function-resources=%s" (toJson .Values.functions.resources)) -}}
{{- $args = append $args (printf "--gateway-resources=%s" (toJson .Values.functions.gatewayResources)) -}}
{{- toYaml $args -}}
{{- end -}}

{{- /*
The sidecar's required node affinity: any of gpuNodes.selectors (all nodes when empty),
and, in exclusive mode, the label that keeps NVIDIA's device plugin off the node.
*/}}
{{- define "faastube.sidecarNodeAffinity" -}}
{{- $g := .Values.sidecar.gpuNodes -}}
{{- $exclusive := list -}}
{{- if $g.exclusive -}}
{{- $exclusive = list (dict "key" $g.exclusiveLabel.key "operator" "In" "values" (list (toString $g.exclusiveLabel.value))) -}}
{{- end -}}
{{- $terms := list -}}
{{- range $g.selectors -}}
{{- $terms = append $terms (dict "matchExpressions" (prepend $exclusive (dict "key" .key "operator" "In" "values" .values))) -}}
{{- end -}}
{{- if and (not $terms) $exclusive -}}
{{- $terms = list (dict "matchExpressions" $exclusive) -}}
{{- end -}}
{{- if $terms -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      {{- toYaml $terms | nindent 6 }}
{{- end -}}
{{- end -}}
