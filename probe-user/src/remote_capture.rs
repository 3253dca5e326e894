//! Captures the collector asks for over the control channel (`bakeoff capture start`): a
//! recording of one cohort, redacted here with the probe's rules plus the command's, streamed to
//! the collector, ended by the first limit reached (requests, bytes, duration), a stop command,
//! or the channel breaking. Every second the collector gets the capture's counters, losses
//! included; the last status says why it ended.

use std::time::{Duration, Instant};

use bakeoff_capture::redact::{Redactor, Rules};
use bakeoff_proto::v1::{
    CaptureStatus, Command, StartCapture, command::Command as Cmd, probe_message::Message,
};

use crate::{
    event::RequestEvent,
    export::control::{ChannelSink, Control},
    pipeline::Pipeline,
    recording::{PROTOCOLS, Recording, RecordingStats, Sink},
};

/// A capture in progress on this probe.
struct Active {
    id: String,
    cohort: String,
    protocol: Option<String>,
    max_requests: u64,
    max_bytes: u64,
    deadline: Option<Instant>,
    /// Requests of the cohort (and protocol) completed since the capture started.
    requests: u64,
}

/// The probe's side of remote captures.
pub struct RemoteCaptures {
    /// `collector.captures` in the configuration: false refuses every capture command.
    enabled: bool,
    experiment: String,
    /// The probe's own redaction rules (`--redact-*`), applied to every capture.
    rules: Rules,
    active: Option<Active>,
}

/// The event protocols a capture's protocol covers.
fn covers(capture: &str, event: &str) -> bool {
    capture == event || (capture == "http2" && event == "grpc")
}

impl RemoteCaptures {
    pub fn new(enabled: bool, experiment: String, rules: Rules) -> Self {
        Self {
            enabled,
            experiment,
            rules,
            active: None,
        }
    }

    /// Whether a capture is recording (its events are counted).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Carries out a command from the collector.
    pub fn command(&mut self, command: Command, pipeline: &mut Pipeline, control: &Control) {
        match command.command {
            Some(Cmd::StartCapture(start)) => {
                let id = start.capture_id.clone();
                if let Err(reason) = self.start(start, pipeline, control) {
                    tracing::warn!(capture = id, reason, "capture refused");
                    control.send(Message::CaptureStatus(CaptureStatus {
                        capture_id: id,
                        state: "failed".into(),
                        reason,
                        ..CaptureStatus::default()
                    }));
                }
            }
            Some(Cmd::StopCapture(stop))
                if self
                    .active
                    .as_ref()
                    .is_some_and(|a| a.id == stop.capture_id) =>
            {
                self.finish(pipeline, control, "stopped".into());
            }
            Some(Cmd::StopCapture(_)) | None => {}
        }
    }

    fn start(
        &mut self,
        start: StartCapture,
        pipeline: &mut Pipeline,
        control: &Control,
    ) -> Result<(), String> {
        if !self.enabled {
            return Err("captures are disabled on this probe (collector.captures: false)".into());
        }
        if start.experiment != self.experiment {
            return Err(format!(
                "this probe's experiment is {:?}, not {:?}",
                self.experiment, start.experiment
            ));
        }
        if let Some(a) = &self.active {
            return Err(format!(
                "capture {} is already recording on this probe",
                a.id
            ));
        }
        if pipeline.recording().is_some() {
            return Err("this probe is recording into a file (--capture-file)".into());
        }
        let cohort = pipeline
            .cohorts()
            .names()
            .iter()
            .position(|n| *n == start.cohort)
            .ok_or_else(|| {
                format!(
                    "no cohort {:?} on this probe (cohorts: {:?})",
                    start.cohort,
                    pipeline.cohorts().names()
                )
            })? as u32
            + 1;
        let protocol = match start.protocol.as_str() {
            "" => None,
            "grpc" => Some("http2".to_string()),
            p if PROTOCOLS.contains(&p) => Some(p.to_string()),
            p => {
                return Err(format!(
                    "unknown protocol {p:?} (one of {PROTOCOLS:?}, grpc)"
                ));
            }
        };
        let mut rules = self.rules.clone();
        rules.headers.extend(start.redact_headers.iter().cloned());
        rules.json_fields.extend(start.redact_json.iter().cloned());
        rules.regexes.extend(start.redact_regex.iter().cloned());
        let redactor = Redactor::new(&rules).map_err(|e| format!("redaction rules: {e}"))?;
        let sink = Sink::Channel(ChannelSink::new(start.capture_id.clone(), control.sender()));
        let max_bytes = if start.max_bytes == 0 {
            u64::MAX
        } else {
            start.max_bytes
        };
        pipeline.start_recording(Recording::new(
            cohort,
            sink,
            protocol.clone(),
            redactor,
            max_bytes,
        ));
        tracing::info!(
            capture = start.capture_id,
            cohort = start.cohort,
            protocol = protocol.as_deref().unwrap_or("any"),
            "capture started"
        );
        self.active = Some(Active {
            id: start.capture_id,
            cohort: start.cohort,
            protocol,
            max_requests: start.max_requests,
            max_bytes: start.max_bytes,
            deadline: (start.duration_ms > 0)
                .then(|| Instant::now() + Duration::from_millis(start.duration_ms)),
            requests: 0,
        });
        self.status(pipeline, control);
        Ok(())
    }

    /// Counts the recorded cohort's completed requests (for `max_requests`).
    pub fn count(&mut self, events: &[RequestEvent]) {
        if let Some(a) = &mut self.active {
            a.requests += events
                .iter()
                .filter(|e| {
                    e.cohort == a.cohort
                        && a.protocol.as_deref().is_none_or(|p| covers(p, &e.protocol))
                })
                .count() as u64;
        }
    }

    /// Every second, and after events: ends the capture at a limit, else reports progress.
    pub fn tick(&mut self, pipeline: &mut Pipeline, control: &Control, report: bool) {
        let Some(a) = &self.active else { return };
        let bytes = pipeline.recording().map_or(0, |r| r.bytes_written());
        let reason = if pipeline.recording().is_none() {
            Some("the recording stopped (write error)".to_string())
        } else if a.max_requests > 0 && a.requests >= a.max_requests {
            Some(format!("{} requests recorded", a.requests))
        } else if a.max_bytes > 0 && bytes >= a.max_bytes {
            Some(format!("{bytes} bytes recorded"))
        } else if a.deadline.is_some_and(|d| Instant::now() >= d) {
            Some("duration reached".to_string())
        } else {
            None
        };
        match reason {
            Some(r) => self.finish(pipeline, control, r),
            None if report => self.status(pipeline, control),
            None => {}
        }
    }

    fn message(a: &Active, stats: &RecordingStats, redaction: &[String]) -> CaptureStatus {
        CaptureStatus {
            capture_id: a.id.clone(),
            state: "recording".into(),
            reason: String::new(),
            requests: a.requests,
            records: stats.records,
            bytes: stats.payload_bytes,
            connections: stats.connections - stats.connections_excluded,
            bytes_lost: stats.bytes_lost,
            records_over_limit: stats.records_over_limit,
            records_dropped: stats.records_dropped,
            fields_masked: stats.fields_masked,
            redaction: redaction.to_vec(),
        }
    }

    fn status(&self, pipeline: &Pipeline, control: &Control) {
        if let (Some(a), Some(r)) = (&self.active, pipeline.recording()) {
            control.send(Message::CaptureStatus(Self::message(
                a,
                &r.stats(),
                r.redaction(),
            )));
        }
    }

    /// Ends the capture: its last records, then its final status with `reason`.
    pub fn finish(&mut self, pipeline: &mut Pipeline, control: &Control, reason: String) {
        let Some(a) = self.active.take() else { return };
        let (stats, redaction, state) = match pipeline.take_recording() {
            Some(r) => {
                let redaction = r.redaction().to_vec();
                match r.finish() {
                    Ok(s) => (s, redaction, "done"),
                    Err(e) => (RecordingStats::default(), redaction, {
                        tracing::warn!(error = %e, "capture end failed");
                        "failed"
                    }),
                }
            }
            None => (RecordingStats::default(), Vec::new(), "failed"),
        };
        tracing::info!(
            capture = a.id,
            reason,
            requests = a.requests,
            records = stats.records,
            "capture ended"
        );
        let mut status = Self::message(&a, &stats, &redaction);
        status.state = state.into();
        status.reason = reason;
        // The end must reach the collector: unlike progress, it is worth a short wait for room.
        let sender = control.sender();
        let message = bakeoff_proto::v1::ProbeMessage {
            message: Some(Message::CaptureStatus(status)),
        };
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(m)) = sender.try_send(message) {
            tokio::spawn(async move {
                let _ = sender.send_timeout(m, Duration::from_secs(5)).await;
            });
        }
    }

    /// The channel broke: the capture ends here (the collector has given it up).
    pub fn disconnected(&mut self, pipeline: &mut Pipeline) {
        if let Some(a) = self.active.take() {
            tracing::warn!(capture = a.id, "control channel lost: capture ended");
            if let Some(r) = pipeline.take_recording() {
                let _ = r.finish();
            }
        }
    }
}
