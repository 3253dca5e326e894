//! Probe configuration: a YAML file, overridden by flags and `BAKEOFF_*` environment variables
//! (the CLI in `main.rs` merges them).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a configuration was refused. Messages name the file, the line where the YAML parser knows
/// it, and the entry.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// One selector set: a process joins the cohort when every given selector matches.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CohortRule {
    /// Cohort name, e.g. `baseline` or `canary`. Several rules may share a name (any matches).
    pub name: String,
    /// cgroup v2 directory (glob allowed), absolute or relative to the cgroup v2 mount.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// A process id (its children follow it).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Executable path glob, matched against `/proc/<pid>/exe`.
    #[serde(default)]
    pub exe: Option<String>,
    /// `NAME=VALUE` (or just `NAME`) in the process environment.
    #[serde(default)]
    pub env: Option<String>,
    /// Pods of this node chosen by Kubernetes objects (needs the `kubernetes` section); a rule
    /// with it takes no other selector.
    #[serde(default)]
    pub kubernetes: Option<KubeSelector>,
}

/// Which pods form a cohort, by Kubernetes objects. With neither `selector`, `argo_rollout` nor
/// `flagger`: the pods labelled `bakeoff.io/cohort: <cohort name>`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubeSelector {
    /// Only pods of this namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Label selector, e.g. `app=checkout,version=v2` (`=`, `==`, `!=`, `key`, `!key`).
    #[serde(default)]
    pub selector: Option<String>,
    /// Pods of this Argo Rollout; `role: stable` (its `status.stableRS`) or `canary` (its
    /// `status.currentPodHash` while it differs from the stable one).
    #[serde(default)]
    pub argo_rollout: Option<String>,
    /// Pods of this Flagger canary's workloads; `role: primary` (`<name>-primary`) or `canary`
    /// (`<name>`).
    #[serde(default)]
    pub flagger: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
}

/// The Kubernetes API, for cohorts by Kubernetes objects and pod metadata on events.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Pod labels copied onto every event (as attributes `k8s.label.<name>`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// A kubeconfig file; default: in-cluster service account (or `KUBECONFIG`).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

impl CohortRule {
    /// A rule made only of a cgroup selector is enforced in the kernel by cgroup id; any other
    /// rule needs user space to look at the process.
    pub fn is_cgroup_only(&self) -> bool {
        (self.cgroup.is_some() || self.kubernetes.is_some())
            && self.pid.is_none()
            && self.exe.is_none()
            && self.env.is_none()
    }

    /// Parses the CLI form `NAME=KIND:VALUE[,KIND:VALUE...]`, e.g.
    /// `canary=env:BAKEOFF_COHORT=canary` or `baseline=cgroup:/sys/fs/cgroup/unified/b`.
    pub fn parse_flag(flag: &str) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: format!("--cohort {flag}"),
            message,
        };
        let (name, selectors) = flag
            .split_once('=')
            .ok_or_else(|| invalid("expected NAME=KIND:VALUE".into()))?;
        let mut rule = CohortRule {
            name: name.to_string(),
            ..Self::default()
        };
        for selector in selectors.split(',') {
            let (kind, value) = selector
                .split_once(':')
                .ok_or_else(|| invalid(format!("selector `{selector}` is not KIND:VALUE")))?;
            match kind {
                "cgroup" => rule.cgroup = Some(value.to_string()),
                "exe" => rule.exe = Some(value.to_string()),
                "env" => rule.env = Some(value.to_string()),
                "pid" => {
                    rule.pid = Some(
                        value
                            .parse()
                            .map_err(|_| invalid(format!("pid `{value}` is not a number")))?,
                    )
                }
                other => {
                    return Err(invalid(format!(
                        "unknown selector kind `{other}` (expected cgroup, pid, exe or env)"
                    )));
                }
            }
        }
        Ok(rule)
    }
}

/// Where request events go as JSON lines.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// `-` for stdout, `none`, or a file path (appended to). Default: stdout, or none when a
    /// collector is configured.
    #[serde(default)]
    pub path: Option<String>,
}

/// The collector the probe streams events to (`bakeoff.v1.Ingest`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// `http://host:port` of the collector's gRPC port.
    pub endpoint: String,
    /// Events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest time an event waits for its batch to fill, in milliseconds.
    #[serde(default = "default_batch_interval_ms")]
    pub batch_interval_ms: u64,
    /// Unacknowledged batches kept in memory before spilling to `spool_dir`.
    #[serde(default = "default_queue_batches")]
    pub queue_batches: usize,
    /// Directory for batches that do not fit in memory (and survive a probe restart).
    #[serde(default)]
    pub spool_dir: Option<std::path::PathBuf>,
    /// Bound of the spool directory in bytes; beyond it the oldest batches are dropped (counted).
    #[serde(default = "default_spool_bytes")]
    pub spool_bytes: u64,
    /// TLS towards the collector (an `https://` endpoint); with `cert` and `key`, mutual TLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Take capture commands from the collector over the control channel (`bakeoff capture
    /// start`). Captures are redacted here, with this probe's rules plus the command's.
    #[serde(default = "default_true")]
    pub captures: bool,
}

/// PEM files for TLS and mutual TLS (rustls).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate(s) that signed the server's certificate.
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// The probe's own certificate and key, for mutual TLS.
    #[serde(default)]
    pub cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key: Option<std::path::PathBuf>,
    /// Name to verify the server certificate against (default: the endpoint's host).
    #[serde(default)]
    pub domain: Option<String>,
}

/// A second, independent export of every request as an OTLP/gRPC server span.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// `http://host:4317` of an OTLP/gRPC receiver (OpenTelemetry Collector, Jaeger, Tempo...).
    pub endpoint: String,
    /// Spans per export request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Spans kept while the receiver is slow or away; beyond it spans are dropped (counted).
    #[serde(default = "default_otlp_queue")]
    pub queue_spans: usize,
    /// `service.name` resource attribute (default: the cohort's executable name).
    #[serde(default)]
    pub service_name: Option<String>,
}

fn default_otlp_queue() -> usize {
    65_536
}

impl OtlpConfig {
    pub fn new(endpoint: String) -> Self {
        Self {
            endpoint,
            batch_size: default_batch_size(),
            queue_spans: default_otlp_queue(),
            service_name: None,
        }
    }
}

fn default_batch_size() -> usize {
    512
}
fn default_batch_interval_ms() -> u64 {
    200
}
fn default_queue_batches() -> usize {
    256
}
fn default_spool_bytes() -> u64 {
    256 << 20
}

impl CollectorConfig {
    pub fn new(endpoint: String) -> Self {
        Self {
            endpoint,
            batch_size: default_batch_size(),
            batch_interval_ms: default_batch_interval_ms(),
            queue_batches: default_queue_batches(),
            spool_dir: None,
            spool_bytes: default_spool_bytes(),
            tls: None,
            captures: true,
        }
    }
}

/// Which kernel hooks watch cohorts named by cgroup.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// cgroup-only rules use `cgroup_skb` hooks on the cohort cgroups (nothing else on the host
    /// pays); other rules use syscall tracepoints.
    #[default]
    Auto,
    /// Every cohort through syscall tracepoints (syscall-time timestamps; sees Unix sockets'
    /// processes the same way as TCP ones).
    Syscall,
}

/// The whole probe configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Experiment name carried by every event.
    #[serde(default = "default_experiment")]
    pub experiment: String,
    /// Node name carried by every event; defaults to the host name.
    #[serde(default)]
    pub node: Option<String>,
    /// Payload bytes captured per syscall (at most 4096). Headers longer than this are not
    /// parsed; byte counts stay exact whatever it is.
    #[serde(default = "default_prefix")]
    pub payload_prefix: u32,
    /// Kernel-to-probe ring buffer size in bytes (a power of two, at least one page).
    #[serde(default = "default_ring")]
    pub ring_buffer_bytes: u32,
    /// Attach the socket and data hooks only while some cohort has a member.
    #[serde(default = "default_true")]
    pub on_demand_hooks: bool,
    #[serde(default)]
    pub cohorts: Vec<CohortRule>,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub collector: Option<CollectorConfig>,
    #[serde(default)]
    pub otlp: Option<OtlpConfig>,
    /// Serve Prometheus `/metrics` on this address (e.g. `0.0.0.0:9464`).
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Kernel hooks for cgroup cohorts.
    #[serde(default)]
    pub data_path: DataPath,
    /// CPU budget, as a share of one core (0.5 = half a core). Above it the probe samples whole
    /// connections, equally in every cohort, instead of slowing the services.
    #[serde(default = "default_max_cpu")]
    pub max_cpu: f64,
    /// Memory bound: connections tracked at most (each also bounds its TCP reassembly buffers).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Watch this node's pods: cohorts by Kubernetes objects, pod metadata on events.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

fn default_max_cpu() -> f64 {
    1.0
}
fn default_max_connections() -> usize {
    crate::conn::DEFAULT_MAX_CONNECTIONS
}

fn default_experiment() -> String {
    "default".into()
}
fn default_prefix() -> u32 {
    probe_common::DEFAULT_PREFIX
}
fn default_ring() -> u32 {
    8 << 20
}
fn default_true() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Self {
            experiment: default_experiment(),
            node: None,
            payload_prefix: default_prefix(),
            ring_buffer_bytes: default_ring(),
            on_demand_hooks: true,
            cohorts: Vec::new(),
            output: OutputConfig::default(),
            collector: None,
            otlp: None,
            metrics_listen: None,
            data_path: DataPath::Auto,
            max_cpu: default_max_cpu(),
            max_connections: default_max_connections(),
            kubernetes: None,
        }
    }
}

impl Config {
    /// Where JSON lines go, if anywhere.
    pub fn json_output(&self) -> Option<&str> {
        match self.output.path.as_deref() {
            Some("none") => None,
            Some(p) => Some(p),
            None if self.collector.is_some() => None,
            None => Some("-"),
        }
    }

    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Parses YAML text; `path` only names the origin in errors.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: match e.location() {
                Some(loc) => format!(
                    "line {}, column {}: {}",
                    loc.line(),
                    loc.column(),
                    strip_location(&e.to_string())
                ),
                None => e.to_string(),
            },
        })?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Checks what the types cannot: limits, names, globs.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        if self.payload_prefix as usize > probe_common::MAX_PREFIX {
            return Err(invalid(format!(
                "payload_prefix {} is larger than the maximum {}",
                self.payload_prefix,
                probe_common::MAX_PREFIX
            )));
        }
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < 4096 {
            return Err(invalid(format!(
                "ring_buffer_bytes {} must be a power of two of at least 4096",
                self.ring_buffer_bytes
            )));
        }
        if !(self.max_cpu.is_finite() && self.max_cpu >= 0.01) {
            return Err(invalid(format!(
                "max_cpu {} must be a share of one core of at least 0.01",
                self.max_cpu
            )));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections must be positive".into()));
        }
        if let Some(c) = &self.collector {
            if !(c.endpoint.starts_with("http://") || c.endpoint.starts_with("https://")) {
                return Err(invalid(format!(
                    "collector.endpoint `{}` must start with http:// or https://",
                    c.endpoint
                )));
            }
            if c.batch_size == 0 || c.queue_batches == 0 {
                return Err(invalid(
                    "collector.batch_size and queue_batches must be positive".into(),
                ));
            }
            if let Some(t) = &c.tls
                && t.cert.is_some() != t.key.is_some()
            {
                return Err(invalid(
                    "collector.tls: give both cert and key (mutual TLS) or neither".into(),
                ));
            }
        }
        if let Some(o) = &self.otlp {
            if !(o.endpoint.starts_with("http://") || o.endpoint.starts_with("https://")) {
                return Err(invalid(format!(
                    "otlp.endpoint `{}` must start with http:// or https://",
                    o.endpoint
                )));
            }
            if o.batch_size == 0 || o.queue_spans == 0 {
                return Err(invalid(
                    "otlp.batch_size and queue_spans must be positive".into(),
                ));
            }
        }
        for (i, rule) in self.cohorts.iter().enumerate() {
            let at = |m: String| invalid(format!("cohorts[{i}] ({}): {m}", rule.name));
            if rule.name.is_empty() {
                return Err(at("name is empty".into()));
            }
            if rule.cgroup.is_none()
                && rule.pid.is_none()
                && rule.exe.is_none()
                && rule.env.is_none()
                && rule.kubernetes.is_none()
            {
                return Err(at(
                    "needs at least one of cgroup, pid, exe, env, kubernetes".into(),
                ));
            }
            if let Some(k) = &rule.kubernetes {
                if rule.cgroup.is_some()
                    || rule.pid.is_some()
                    || rule.exe.is_some()
                    || rule.env.is_some()
                {
                    return Err(at("kubernetes takes no other selector".into()));
                }
                if self.kubernetes.is_none() {
                    return Err(at(
                        "kubernetes rules need the top-level `kubernetes` section".into(),
                    ));
                }
                crate::kubernetes::PodRule::new(k, &rule.name).map_err(at)?;
            }
            for glob in [&rule.cgroup, &rule.exe].into_iter().flatten() {
                globset::Glob::new(glob).map_err(|e| at(format!("bad glob `{glob}`: {e}")))?;
            }
            if let Some(env) = &rule.env
                && env.split('=').next().is_none_or(str::is_empty)
            {
                return Err(at(format!("env `{env}` has no variable name")));
            }
        }
        Ok(())
    }
}

/// serde_yaml puts " at line L column C" in its message; we print the location first instead.
fn strip_location(message: &str) -> &str {
    match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped Kubernetes ConfigMap must hold a configuration this probe accepts.
    #[test]
    fn the_kubernetes_configmap_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/base/probe-config.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config_map = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
            .find(|d| d["kind"] == "ConfigMap")
            .expect("a ConfigMap");
        let embedded = config_map["data"]["probe.yaml"].as_str().unwrap();
        let c = Config::from_yaml(embedded, &path).unwrap();
        assert_eq!(c.cohorts.len(), 2);
        assert!(c.cohorts.iter().all(|r| r.kubernetes.is_some()));
        assert!(c.kubernetes.is_some());
        let collector = c.collector.as_ref().unwrap();
        assert!(collector.endpoint.starts_with("http://bakeoff-collector."));
        assert_eq!(c.metrics_listen.map(|a| a.port()), Some(9464));
        assert_eq!(c.json_output(), None);
    }

    #[test]
    fn parses_full_file() {
        let yaml = "experiment: checkout\npayload_prefix: 512\ncohorts:\n  - name: baseline\n    cgroup: /sys/fs/cgroup/unified/b\n  - name: canary\n    env: BAKEOFF_COHORT=canary\n    exe: /usr/bin/*\n";
        let c = Config::from_yaml(yaml, Path::new("c.yaml")).unwrap();
        assert_eq!(c.experiment, "checkout");
        assert_eq!(c.payload_prefix, 512);
        assert_eq!(c.cohorts.len(), 2);
        assert!(c.cohorts[0].is_cgroup_only());
        assert!(!c.cohorts[1].is_cgroup_only());
    }

    #[test]
    fn unknown_field_names_file_and_line() {
        let yaml = "experiment: x\ncohorts:\n  - name: canary\n    exec: /bin/x\n";
        let e = Config::from_yaml(yaml, Path::new("probe.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("probe.yaml: line 4, column 5: "), "{e}");
        assert!(e.contains("unknown field `exec`"), "{e}");
    }

    #[test]
    fn wrong_type_is_reported_with_line() {
        let yaml = "payload_prefix: lots\n";
        let e = Config::from_yaml(yaml, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.yaml: line 1, column 17: "), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_entry() {
        let yaml = "cohorts:\n  - name: canary\n";
        let e = Config::from_yaml(yaml, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "p.yaml: cohorts[0] (canary): needs at least one of cgroup, pid, exe, env, kubernetes"
        );
        let yaml = "payload_prefix: 100000\n";
        let e = Config::from_yaml(yaml, Path::new("p.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than the maximum 4096"), "{e}");
    }

    #[test]
    fn cohort_flags() {
        let r = CohortRule::parse_flag("canary=env:BAKEOFF_COHORT=canary,exe:/usr/sbin/*").unwrap();
        assert_eq!(r.name, "canary");
        assert_eq!(r.env.as_deref(), Some("BAKEOFF_COHORT=canary"));
        assert_eq!(r.exe.as_deref(), Some("/usr/sbin/*"));
        assert!(CohortRule::parse_flag("canary=pid:abc").is_err());
        assert!(CohortRule::parse_flag("canary=port:80").is_err());
        assert!(CohortRule::parse_flag("canary").is_err());
    }
}
