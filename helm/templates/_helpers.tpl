{{/*
Named templates for a seller's pod spec. Call them with the root context of *your* chart ($);
they read this chart's values from .Values["marketplace-sidecar"] when included from a parent
chart, and from .Values when this chart renders itself. They never read .Chart: from a parent
chart it is the *parent's* Chart.yaml (its name, version and appVersion), not this one's.

  spec:
    serviceAccountName: {{ include "marketplace-sidecar.serviceAccountName" $ }}
    automountServiceAccountToken: {{ include "marketplace-sidecar.automountServiceAccountToken" $ }}
    readinessGates: {{- include "marketplace-sidecar.readinessGates" $ | nindent 6 }}
    initContainers: {{- include "marketplace-sidecar.initContainers" $ | nindent 6 }}
    containers:     {{- include "marketplace-sidecar.containers" $ | nindent 6 }}
      - name: your-product ...
    volumes:        {{- include "marketplace-sidecar.volumes" $ | nindent 6 }}
*/}}

{{- define "marketplace-sidecar.values" -}}
{{- if hasKey .Values "marketplace-sidecar" -}}
{{- toYaml (index .Values "marketplace-sidecar") -}}
{{- else -}}
{{- toYaml .Values -}}
{{- end -}}
{{- end -}}

{{- define "marketplace-sidecar.fullname" -}}
{{- if contains "marketplace-sidecar" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-marketplace-sidecar" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels for this chart's own objects (rendered with its own .Chart, also as a dependency). */}}
{{- define "marketplace-sidecar.labels" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
app.kubernetes.io/name: marketplace-sidecar
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ $v.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with $v.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "marketplace-sidecar.native" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if eq $v.mode "native" -}}true
{{- else if eq $v.mode "classic" -}}
{{- else if semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version -}}true
{{- end -}}
{{- end -}}

{{/*
The pod's ServiceAccount: the chart's own (serviceAccount.create, the default), or, with
serviceAccount.create=false, the one named in serviceAccount.name: your own, already annotated for
IRSA with a role that may call AWS Marketplace metering. Without a name the pod would reference an
account nobody creates: refused here rather than in the ReplicaSet's events.
*/}}
{{- define "marketplace-sidecar.serviceAccountName" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if and (not $v.serviceAccount.create) (not $v.serviceAccount.name) -}}
{{- fail "serviceAccount.create=false needs serviceAccount.name: the ServiceAccount your pods already run as (annotated eks.amazonaws.com/role-arn with a role allowed to meter)" -}}
{{- end -}}
{{- $v.serviceAccount.name | default (include "marketplace-sidecar.fullname" .) -}}
{{- end -}}

{{/*
Your workload's replica count, refused when it would make several senders: in SaaS mode on the
sidecar's own SQLite store each replica keeps its own count and sends it, and AWS keeps only the
first record of a customer, dimension and hour (the others come back as DuplicateRecord). Call it
for every count your chart sets (the Deployment's replicas, the autoscaler's maxReplicas):
  replicas: {{ include "marketplace-sidecar.replicas" (dict "root" $ "replicas" .Values.replicas) }}
  maxReplicas: {{ include "marketplace-sidecar.replicas" (dict "root" $ "replicas" .Values.autoscaling.maxReplicas "field" "autoscaling.maxReplicas") }}
*/}}
{{- define "marketplace-sidecar.replicas" -}}
{{- $v := include "marketplace-sidecar.values" .root | fromYaml -}}
{{- $n := int (required "marketplace-sidecar.replicas: pass (dict \"root\" $ \"replicas\" <your count>)" .replicas) -}}
{{- if and (eq $v.metering.mode "saas") (include "marketplace-sidecar.localState" .root) (gt $n 1) -}}
{{- fail (printf "%s=%d in saas mode needs metering.saas.database.existingSecret (PostgreSQL, one store and one sender for the fleet): the SQLite store serves ONE replica, and replicas each sending their own count would be billed the first count only" (.field | default "replicas") $n) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/*
The volume mount that gives YOUR container the pod ServiceAccount's API token, CA and namespace
where automount would have put them (productToken.enabled). The pod never automounts a token
(automountServiceAccountToken: false), so without it your container has none:
  - name: your-product
    {{- with (include "marketplace-sidecar.productVolumeMounts" $) }}
    volumeMounts: {{- . | nindent 6 }}
    {{- end }}
*/}}
{{- define "marketplace-sidecar.productVolumeMounts" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if $v.productToken.enabled -}}
- {name: marketplace-sidecar-product-token, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
{{- end -}}
{{- end -}}

{{/*
Always false: no container of the pod gets a Kubernetes API token by automount. When the
readiness gate or Events need the API, a projected token is mounted into the sidecar container
only ("marketplace-sidecar.volumes"), so the product container cannot patch pod conditions.
IRSA's web-identity token is a separate projected volume that EKS adds itself.
*/}}
{{- define "marketplace-sidecar.automountServiceAccountToken" -}}
false
{{- end -}}

{{/* "true" when the sidecar talks to the Kubernetes API (readiness gate or Events). */}}
{{- define "marketplace-sidecar.kubeApi" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if or $v.readinessGate.enabled $v.events.enabled -}}true{{- end -}}
{{- end -}}

{{- define "marketplace-sidecar.image" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- $repo := $v.image.repository -}}
{{- if $v.image.registry }}{{ $repo = printf "%s/%s" $v.image.registry $repo }}{{ end -}}
{{- if $v.image.digest -}}
{{- printf "%s@%s" $repo $v.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (required "image.tag (or image.digest) is required: the sidecar's version, e.g. 0.1.0" $v.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "marketplace-sidecar.configSource" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if $v.product.existingSecret -}}
secret: {{ $v.product.existingSecret }}
{{- else if $v.product.existingConfigMap -}}
configMap: {{ $v.product.existingConfigMap }}
{{- else -}}
configMap: {{ include "marketplace-sidecar.fullname" . }}
{{- end -}}
{{- end -}}

{{/* "true" when the sidecar gets MARKETPLACE_PRODUCT_CODE: every mode but SaaS with license
identity needs it; there it is optional and, when given, pins ResolveCustomer to this product. */}}
{{- define "marketplace-sidecar.needsProductCode" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if and (eq $v.metering.mode "contract") $v.metering.dimensions -}}true{{/* MeterUsage: contract with consumption */}}
{{- else if ne $v.metering.mode "contract" -}}
{{- if or (ne $v.metering.mode "saas") (eq $v.metering.saas.identity "customer_identifier") $v.product.code $v.product.existingSecret $v.product.existingConfigMap -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when the sidecar keeps its state in the state volume: every mode but SaaS on
PostgreSQL (contract mode keeps its checkout and the product's leases there). */}}
{{- define "marketplace-sidecar.localState" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if not (and (eq $v.metering.mode "saas") $v.metering.saas.database.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* "true" in contract mode off AWS: the buyer's license token (a Secret) and role, not IRSA. */}}
{{- define "marketplace-sidecar.anywhere" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- $a := $v.metering.contract.anywhere -}}
{{- if and (eq $v.metering.mode "contract") (or $a.existingSecret $a.token) -}}true{{- end -}}
{{- end -}}

{{/* The Secret holding the license token: the buyer's own, or the one this chart creates. */}}
{{- define "marketplace-sidecar.licenseSecret" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- $v.metering.contract.anywhere.existingSecret | default (printf "%s-license" (include "marketplace-sidecar.fullname" .)) -}}
{{- end -}}

{{- define "marketplace-sidecar.container" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- $src := include "marketplace-sidecar.configSource" . | fromYaml -}}
{{- $native := include "marketplace-sidecar.native" . -}}
{{- $saas := eq $v.metering.mode "saas" -}}
{{- $contract := eq $v.metering.mode "contract" -}}
{{- $anywhere := include "marketplace-sidecar.anywhere" . -}}
{{- if $contract -}}
{{- if or $v.readinessGate.enabled $v.events.enabled -}}
{{- fail "readinessGate.enabled and events.enabled are not supported with metering.mode=contract yet (the sidecar refuses them): the pod's readiness follows /readyz" -}}
{{- end -}}
{{- if and $v.metering.contract.anywhere.existingSecret $v.metering.contract.anywhere.token -}}
{{- fail "metering.contract.anywhere: set existingSecret or token, not both (the token is a credential: prefer existingSecret)" -}}
{{- end -}}
{{- end -}}
{{- if and $v.metering.fleetSize (or $saas $contract) -}}
{{- fail "metering.fleetSize is only used with metering.mode=hourly (RegisterUsage at start) or custom (MeterUsage's slots): remove it" -}}
{{- end -}}
{{- with $v.metering.entitlementDimension -}}
{{- if or (ne $v.metering.mode "custom") (ne $v.metering.entitlementCheck "meter_zero") -}}
{{- fail "metering.entitlementDimension is only used with metering.mode=custom and metering.entitlementCheck=meter_zero: remove it" -}}
{{- end -}}
{{- if not (has . $v.metering.dimensions) -}}
{{- fail (printf "metering.entitlementDimension=%s is not one of metering.dimensions: list the dimension you published for the start check there too" .) -}}
{{- end -}}
{{- end -}}
{{- if eq $v.metering.mode "custom" -}}
{{- $limit := $v.metering.stateSizeLimit -}}
{{- $unit := get (dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824) (regexFind "(Ki|Mi|Gi)$" $limit) -}}
{{- if lt (mul (regexReplaceAll "(Ki|Mi|Gi)$" $limit "" | int64) $unit) 16777216 -}}
{{- fail (printf "metering.stateSizeLimit=%s: custom mode needs at least 16Mi (the usage store, its WAL and a margin); see docs/custom-capacity.md" $limit) -}}
{{- end -}}
{{- end -}}
{{- if eq $v.metering.mode "hourly" -}}
{{- with $v.metering.fleetSize -}}
{{- /* the sidecar's own check (1.2 x fleet / 5 s, at least 5 s, within half the deadline): else every pod exits 2 */ -}}
{{- $window := maxf 5.0 (divf (mulf 1.2 (float64 .)) 5.0) -}}
{{- if gt $window (divf (float64 $v.config.registerDeadlineSeconds) 2.0) -}}
{{- fail (printf "metering.fleetSize=%d: the pods spread their retries over %g s, more than half of config.registerDeadlineSeconds=%v: lower it or raise the deadline" (int64 .) $window $v.config.registerDeadlineSeconds) -}}
{{- end -}}
{{- end -}}
{{- end -}}
- name: marketplace-sidecar
  image: {{ include "marketplace-sidecar.image" . }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if $native }}
  restartPolicy: Always
  {{- end }}
  args: ["run"]
  env:
    {{- if include "marketplace-sidecar.needsProductCode" . }}
    - name: MARKETPLACE_PRODUCT_CODE
      valueFrom:
        {{- if $src.secret }}
        secretKeyRef: {name: {{ $src.secret }}, key: {{ $v.product.productCodeKey }}}
        {{- else }}
        configMapKeyRef: {name: {{ $src.configMap }}, key: {{ $v.product.productCodeKey }}}
        {{- end }}
    {{- end }}
    {{- if $saas }}
    - {name: MARKETPLACE_MODE, value: saas}
    - {name: MARKETPLACE_DIMENSIONS, value: {{ join "," $v.metering.dimensions | quote }}}
    - {name: MARKETPLACE_SAAS_IDENTITY, value: {{ $v.metering.saas.identity | quote }}}
    - {name: MARKETPLACE_ACCEPT_UNRESOLVED_CUSTOMERS, value: {{ $v.metering.saas.acceptUnresolvedCustomers | toString | quote }}}
    - {name: MARKETPLACE_ZERO_USAGE_RECORDS, value: {{ $v.metering.saas.zeroUsageRecords | toString | quote }}}
    {{- with ($v.metering.saas.events | default dict).queueUrl }}
    - {name: MARKETPLACE_SAAS_EVENTS_QUEUE_URL, value: {{ . | quote }}}
    {{- end }}
    {{- with $v.metering.saas.contractDimensions }}
    - {name: MARKETPLACE_SAAS_CONTRACT_DIMENSIONS, value: {{ . | quote }}}
    {{- end }}
    - {name: MARKETPLACE_DRAIN_SECONDS, value: {{ $v.metering.drainSeconds | quote }}}
    {{- with $v.metering.saas.database.existingSecret }}
    # The URL holds a password: from your Secret, into this container only.
    - name: MARKETPLACE_USAGE_DATABASE_URL
      valueFrom:
        secretKeyRef: {name: {{ . }}, key: {{ $v.metering.saas.database.key }}}
    {{- end }}
    {{- else if $contract }}
    {{- $c := $v.metering.contract }}
    - {name: MARKETPLACE_MODE, value: contract}
    - {name: MARKETPLACE_LICENSE_PRODUCT_SKU, value: {{ $c.productSku | quote }}}
    - {name: MARKETPLACE_LICENSE_ENTITLEMENTS, value: {{ toJson $c.entitlements | quote }}}
    - {name: MARKETPLACE_LICENSE_CHECKOUT_TYPE, value: {{ $c.checkoutType | quote }}}
    - {name: MARKETPLACE_LICENSE_ON_LOSS, value: {{ $c.onLoss | quote }}}
    {{- with $c.checkSeconds }}
    - {name: MARKETPLACE_LICENSE_CHECK_SECONDS, value: {{ int64 . | toString | quote }}}
    {{- end }}
    {{- with $c.keyFingerprint }}
    - {name: MARKETPLACE_LICENSE_KEY_FINGERPRINT, value: {{ . | quote }}}
    {{- end }}
    {{- with $c.leaseTimeoutSeconds }}
    - {name: MARKETPLACE_LICENSE_LEASE_TIMEOUT_SECONDS, value: {{ int64 . | toString | quote }}}
    {{- end }}
    - {name: MARKETPLACE_DRAIN_SECONDS, value: {{ $v.metering.drainSeconds | quote }}}
    {{- if $anywhere }}
    # Off AWS: the buyer's license token (a file from the Secret, in this container only) and
    # the role it assumes; no metadata service to find the region from.
    - {name: MARKETPLACE_LICENSE_TOKEN_FILE, value: /var/run/secrets/marketplace-license/license_token}
    {{- if $c.anywhere.roleArn }}
    - {name: MARKETPLACE_LICENSE_ROLE_ARN, value: {{ $c.anywhere.roleArn | quote }}}
    {{- else }}
    - name: MARKETPLACE_LICENSE_ROLE_ARN
      valueFrom:
        secretKeyRef: {name: {{ include "marketplace-sidecar.licenseSecret" . }}, key: {{ $c.anywhere.roleArnKey }}}
    {{- end }}
    - {name: AWS_REGION, value: {{ $c.anywhere.region | quote }}}
    {{- end }}
    {{- if $v.metering.dimensions }}
    # Contract with consumption: usage above the contract goes to MeterUsage through the usage
    # store in the state volume, sent only once the license is checked out.
    - {name: MARKETPLACE_DIMENSIONS, value: {{ join "," $v.metering.dimensions | quote }}}
    - {name: MARKETPLACE_STATE_VOLUME_BYTES, value: {{ $v.metering.stateSizeLimit | quote }}}
    - {name: MARKETPLACE_METER_CALLS_PER_SECOND, value: {{ $v.metering.meterCallsPerSecond | quote }}}
    {{- include "marketplace-sidecar.podIndexEnv" . }}
    {{- end }}
    {{- else if eq $v.metering.mode "custom" }}
    - {name: MARKETPLACE_MODE, value: custom}
    - {name: MARKETPLACE_DIMENSIONS, value: {{ join "," $v.metering.dimensions | quote }}}
    - {name: MARKETPLACE_ENTITLEMENT_CHECK, value: {{ $v.metering.entitlementCheck | quote }}}
    {{- with $v.metering.entitlementDimension }}
    - {name: MARKETPLACE_ENTITLEMENT_DIMENSION, value: {{ . | quote }}}
    {{- end }}
    - {name: MARKETPLACE_DRAIN_SECONDS, value: {{ $v.metering.drainSeconds | quote }}}
    # The emptyDir's sizeLimit, which statvfs cannot show: usage is refused (503) at 90% of it.
    - {name: MARKETPLACE_STATE_VOLUME_BYTES, value: {{ $v.metering.stateSizeLimit | quote }}}
    # The hourly MeterUsage slots: the fleet's calls per second and, if set, its size.
    - {name: MARKETPLACE_METER_CALLS_PER_SECOND, value: {{ $v.metering.meterCallsPerSecond | quote }}}
    {{- with $v.metering.fleetSize }}
    - {name: MARKETPLACE_FLEET_SIZE, value: {{ int64 . | toString | quote }}}
    {{- end }}
    {{- include "marketplace-sidecar.podIndexEnv" . }}
    {{- else }}
    - {name: MARKETPLACE_PUBLIC_KEY_FILE, value: /etc/marketplace-sidecar/public-key.pem}
    - {name: MARKETPLACE_PUBLIC_KEY_VERSION, value: {{ $v.product.publicKeyVersion | quote }}}
    {{- with $v.metering.fleetSize }}
    - {name: MARKETPLACE_FLEET_SIZE, value: {{ int64 . | toString | quote }}}
    {{- end }}
    {{- end }}
    - {name: MARKETPLACE_LISTEN, value: "127.0.0.1:{{ $v.config.apiPort }}"}
    - {name: MARKETPLACE_PROBE_LISTEN, value: "0.0.0.0:{{ $v.config.probePort }}"}
    {{- if include "marketplace-sidecar.localState" . }}
    - {name: MARKETPLACE_STATE_DIR, value: /var/lib/marketplace-sidecar}
    {{- end }}
    {{- if $contract }}
    - {name: MARKETPLACE_REGISTER_DEADLINE_SECONDS, value: {{ $v.config.registerDeadlineSeconds | quote }}}
    {{- else if not $saas }}
    - {name: MARKETPLACE_REGISTER_INTERVAL_SECONDS, value: {{ $v.config.registerIntervalSeconds | quote }}}
    - {name: MARKETPLACE_REGISTER_DEADLINE_SECONDS, value: {{ $v.config.registerDeadlineSeconds | quote }}}
    {{- end }}
    - {name: MARKETPLACE_LOG_FORMAT, value: {{ $v.config.logFormat | quote }}}
    - {name: MARKETPLACE_LOG_LEVEL, value: {{ $v.config.logLevel | quote }}}
    {{- if $v.readinessGate.enabled }}
    - {name: MARKETPLACE_READINESS_GATE, value: {{ $v.readinessGate.conditionType | quote }}}
    {{- end }}
    {{- if $v.events.enabled }}
    - {name: MARKETPLACE_KUBE_EVENTS, value: "true"}
    {{- end }}
    {{- if include "marketplace-sidecar.kubeApi" . }}
    - {name: MARKETPLACE_SERVICEACCOUNT_DIR, value: /var/run/secrets/kubernetes.io/serviceaccount}
    - name: MARKETPLACE_POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: MARKETPLACE_POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - {name: mp-probe, containerPort: {{ $v.config.probePort }}, protocol: TCP}
  {{- /* saas: no entitlement to wait for, and the usage store is shared by every pod: a
         database outage must not hold back the backend nor take every pod out of its Service.
         The backend starts, gets 503 + Retry-After and retries; /readyz still says why. */}}
  {{- $gate := ternary "/healthz" "/readyz" $saas }}
  {{- if $native }}
  startupProbe:
    httpGet: {path: {{ $gate }}, port: mp-probe}
    {{- toYaml $v.startupProbe | nindent 4 }}
  {{- end }}
  readinessProbe:
    httpGet: {path: {{ $gate }}, port: mp-probe}
    {{- toYaml $v.readinessProbe | nindent 4 }}
  livenessProbe:
    httpGet: {path: /healthz, port: mp-probe}
    {{- toYaml $v.livenessProbe | nindent 4 }}
  resources:
    {{- toYaml (ternary $v.readinessGate.resources $v.resources (include "marketplace-sidecar.kubeApi" . | eq "true")) | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  {{- if or (include "marketplace-sidecar.localState" .) (include "marketplace-sidecar.kubeApi" .) $anywhere }}
  volumeMounts:
    {{- if eq $v.metering.mode "hourly" }}
    - {name: marketplace-sidecar-key, mountPath: /etc/marketplace-sidecar, readOnly: true}
    {{- end }}
    {{- if include "marketplace-sidecar.localState" . }}
    - {name: marketplace-sidecar-state, mountPath: /var/lib/marketplace-sidecar}
    {{- end }}
    {{- if include "marketplace-sidecar.kubeApi" . }}
    # The API token, CA, namespace and pod UID: in this container only (see "volumes").
    - {name: marketplace-sidecar-kube-api, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
    {{- end }}
    {{- if $anywhere }}
    # The buyer's license token: in this container only (see "volumes").
    - {name: marketplace-sidecar-license, mountPath: /var/run/secrets/marketplace-license, readOnly: true}
    {{- end }}
  {{- end }}
{{- end -}}

{{- define "marketplace-sidecar.initContainers" -}}
{{- if include "marketplace-sidecar.native" . -}}
{{ include "marketplace-sidecar.container" . }}
{{- end -}}
{{- end -}}

{{- define "marketplace-sidecar.containers" -}}
{{- if not (include "marketplace-sidecar.native" .) -}}
{{ include "marketplace-sidecar.container" . }}
{{- end -}}
{{- end -}}

{{/* Prometheus scrape annotations for the pod template, when metrics.podAnnotations. */}}
{{- define "marketplace-sidecar.podAnnotations" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if $v.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ $v.config.probePort | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{- define "marketplace-sidecar.readinessGates" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- if $v.readinessGate.enabled -}}
- conditionType: {{ $v.readinessGate.conditionType }}
{{- end -}}
{{- end -}}

{{- define "marketplace-sidecar.volumes" -}}
{{- $v := include "marketplace-sidecar.values" . | fromYaml -}}
{{- $src := include "marketplace-sidecar.configSource" . | fromYaml -}}
{{- if eq $v.metering.mode "hourly" -}}
- name: marketplace-sidecar-key
  {{- if $src.secret }}
  secret:
    secretName: {{ $src.secret }}
    items: [{key: {{ $v.product.publicKeyKey }}, path: public-key.pem}]
  {{- else }}
  configMap:
    name: {{ $src.configMap }}
    items: [{key: {{ $v.product.publicKeyKey }}, path: public-key.pem}]
  {{- end }}
{{ end -}}
{{- if include "marketplace-sidecar.localState" . -}}
{{- if and (eq $v.metering.mode "saas") $v.metering.saas.state.existingClaim -}}
# The SaaS SQLite store outlives the pod: unsent hours survive a rollout or a node loss.
- name: marketplace-sidecar-state
  persistentVolumeClaim: {claimName: {{ $v.metering.saas.state.existingClaim }}}
{{- else -}}
# Pod-lifetime state: survives sidecar restarts so AWS's first-call verdict (hourly), the
# usage store (custom) or the license checkout and the product's leases (contract) are kept.
- name: marketplace-sidecar-state
  emptyDir: {sizeLimit: {{ eq $v.metering.mode "hourly" | ternary "1Mi" (ternary "4Mi" $v.metering.stateSizeLimit (and (eq $v.metering.mode "contract") (not $v.metering.dimensions))) }}}
{{- end }}
{{- end }}
{{- if include "marketplace-sidecar.anywhere" . }}
# The buyer's License Manager license token, for the sidecar container alone. A Secret update
# (a rotated token) reaches the file within the kubelet's sync period; the sidecar reads it at
# every credential refresh.
- name: marketplace-sidecar-license
  secret:
    secretName: {{ include "marketplace-sidecar.licenseSecret" . }}
    defaultMode: 292  # 0444: the sidecar runs as a non-root user
    items: [{key: {{ $v.metering.contract.anywhere.tokenKey }}, path: license_token}]
{{- end }}
{{- if $v.productToken.enabled }}
# What automount would give every container, for YOUR container only (productToken.enabled):
# the same ServiceAccount's token, so it also carries the sidecar's Role when the gate or
# Events are on.
- name: marketplace-sidecar-product-token
  projected:
    defaultMode: 292  # 0444
    sources:
      - serviceAccountToken: {path: token, expirationSeconds: 3607}
      - configMap:
          name: kube-root-ca.crt
          items: [{key: ca.crt, path: ca.crt}]
      - downwardAPI:
          items:
            - {path: namespace, fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}}
{{- end }}
{{- if include "marketplace-sidecar.kubeApi" . }}
# What automount would give every container, projected for the sidecar container alone, plus
# the pod's UID (for Events) so the Role needs no `get pods`.
- name: marketplace-sidecar-kube-api
  projected:
    defaultMode: 292  # 0444
    sources:
      - serviceAccountToken: {path: token, expirationSeconds: 3607}
      - configMap:
          name: kube-root-ca.crt
          items: [{key: ca.crt, path: ca.crt}]
      - downwardAPI:
          items:
            - {path: namespace, fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}}
            - {path: pod-uid, fieldRef: {apiVersion: v1, fieldPath: metadata.uid}}
{{- end }}
{{- end -}}

{{/*
A StatefulSet pod's ordinal, its own hourly MeterUsage slot: Kubernetes 1.28+ labels the pods
of a StatefulSet with apps.kubernetes.io/pod-index. Any other pod (a Deployment's) has no such
label and the downward API gives "": the sidecar then reads the ordinal from a StatefulSet
pod's name or hashes the name (docs/custom-capacity.md). No RBAC: the kubelet fills it in.
*/}}
{{- define "marketplace-sidecar.podIndexEnv" }}
    - name: MARKETPLACE_POD_INDEX
      valueFrom: {fieldRef: {fieldPath: "metadata.labels['apps.kubernetes.io/pod-index']"}}
{{- end -}}
