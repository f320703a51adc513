//! The engine's errors as Python exceptions a caller can act on: instances of the package's own
//! classes (`cinecut_engine._types`: real classes, their attributes typed and set by their
//! constructors) — `VramError` with `gpu`, `free_mib` and `required_mib`; `StartError` with
//! `exit_code`, `signal` and `output_tail`; `RequestError` with `kind`, `subject`, `status` (HTTP)
//! and, for a death, `exit_code` and `signal`; the source as `__cause__` where there is one; every
//! setting named by its Python keyword (`min_vram_mib=`).

use engine_core::error::{LockError, ServerDeath, VramError as CoreVram};
use engine_core::process::ChildExit;
use engine_core::request::Subject;
use engine_core::setting::{ConfigError, Setting};
use engine_core::{EngineError, RequestError as CoreRequest, StartError as CoreStart};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// An instance of the package's exception class `class`, with `detail` and the typed `fields`,
/// as the error to raise. Should making it fail (the package broken), that failure is raised.
fn raise(py: Python<'_>, class: &str, detail: String, fields: &[(&str, Py<PyAny>)]) -> PyErr {
    let made = (|| -> PyResult<Bound<'_, PyAny>> {
        let kwargs = PyDict::new(py);
        for (name, value) in fields {
            kwargs.set_item(name, value)?;
        }
        crate::convert::types(py)?
            .getattr(class)?
            .call((detail,), Some(&kwargs))
    })();
    match made {
        Ok(instance) => PyErr::from_value(instance),
        Err(e) => e,
    }
}

/// How Python names what the library calls `setting`: the keyword argument.
pub fn keyword(setting: Setting) -> String {
    let name = match setting {
        Setting::Model => "model_path",
        Setting::Mmproj => "mmproj_path",
        Setting::StartupTimeout => "startup_timeout_s",
        Setting::StopGrace => "stop_grace_s",
        Setting::VramRecoveryTimeout => "vram_recovery_timeout_s",
        Setting::RequestTimeout => "request_timeout_s",
        Setting::Args => "server_args",
        Setting::ImageTransport => "image_transport",
        Setting::VramQueryTimeout => return "the nvidia-smi timeout".into(),
        Setting::HealthPollInterval => return "the readiness poll".into(),
        Setting::MaxFrameBytes => return "the frame size limit".into(),
        Setting::VramProbe => "vram_probe",
        Setting::Debug => return "debug=True".into(),
        other => other.name(),
    };
    format!("{name}=")
}

/// An engine message in Python's words.
pub fn say(message: impl std::fmt::Display) -> String {
    Setting::reword(&message.to_string(), keyword)
}

/// A configuration mistake: the caller's, so a `ValueError`.
pub fn config(e: ConfigError) -> PyErr {
    PyValueError::new_err(say(e))
}

fn none(py: Python<'_>) -> Py<PyAny> {
    py.None()
}

/// `exit_code` and `signal` of an exit.
fn exit(py: Python<'_>, status: ChildExit) -> [(&'static str, Py<PyAny>); 2] {
    let (code, signal) = match status {
        ChildExit::Code(code) => (
            code.into_pyobject(py).unwrap().into_any().unbind(),
            none(py),
        ),
        ChildExit::Signal(sig) => (none(py), sig.into_pyobject(py).unwrap().into_any().unbind()),
    };
    [("exit_code", code), ("signal", signal)]
}

fn string(py: Python<'_>, text: &str) -> Py<PyAny> {
    text.into_pyobject(py).unwrap().into_any().unbind()
}

/// An `OSError` from an I/O error, as a `__cause__`.
fn os_error(e: &std::io::Error) -> PyErr {
    PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string()))
}

/// A VRAM failure.
pub fn vram(py: Python<'_>, e: &CoreVram) -> PyErr {
    vram_saying(py, e, say(e))
}

/// A VRAM failure, said as `message`.
fn vram_saying(py: Python<'_>, e: &CoreVram, message: String) -> PyErr {
    let number = |n: u64| n.into_pyobject(py).unwrap().into_any().unbind();
    let (gpu, free, required) = match e {
        CoreVram::Insufficient {
            gpu,
            free_mib,
            min_mib,
        }
        | CoreVram::NotFreed {
            gpu,
            free_mib,
            min_mib,
            ..
        }
        | CoreVram::TooSmall {
            gpu,
            free_mib,
            need_mib: min_mib,
            ..
        } => (number(u64::from(*gpu)), number(*free_mib), number(*min_mib)),
        CoreVram::Unreadable { gpu, .. } => (number(u64::from(*gpu)), none(py), none(py)),
        _ => (none(py), none(py), none(py)),
    };
    let err = raise(
        py,
        "VramError",
        message,
        &[("gpu", gpu), ("free_mib", free), ("required_mib", required)],
    );
    if let CoreVram::Spawn { source, .. } = e {
        err.set_cause(py, Some(os_error(source)));
    }
    err
}

/// A start that failed.
pub fn start(py: Python<'_>, e: &CoreStart) -> PyErr {
    let (status, tail) = match e {
        CoreStart::ExitedDuringStartup {
            status,
            output_tail,
        } => (Some(*status), Some(output_tail.as_str())),
        CoreStart::Timeout { output_tail, .. } => (None, Some(output_tail.as_str())),
        _ => (None, None),
    };
    let mut attributes: Vec<(&str, Py<PyAny>)> = match status {
        Some(status) => exit(py, status).into(),
        None => vec![("exit_code", none(py)), ("signal", none(py))],
    };
    attributes.push((
        "output_tail",
        tail.map_or_else(|| none(py), |t| string(py, t)),
    ));
    let err = raise(py, "StartError", say(e), &attributes);
    match e {
        CoreStart::Listen { source, .. }
        | CoreStart::Spawn { source, .. }
        | CoreStart::LogFile { source, .. } => err.set_cause(py, Some(os_error(source))),
        _ => {}
    }
    err
}

/// What a request error is, in one word.
fn kind(e: &CoreRequest) -> &'static str {
    match e {
        CoreRequest::ServerDied { .. } => "server_died",
        CoreRequest::BadImage { .. } => "bad_image",
        CoreRequest::InvalidPrompt { .. } => "invalid_prompt",
        CoreRequest::Http { .. } => "http",
        CoreRequest::Timeout { .. } => "timeout",
        CoreRequest::Transport { .. } => "transport",
        CoreRequest::InvalidOutput { .. } => "invalid_output",
        CoreRequest::ContextExhausted { .. } => "context_exhausted",
        CoreRequest::NoServerLeft { .. } => "not_attempted",
        CoreRequest::Cancelled { .. } => "cancelled",
        _ => "other",
    }
}

/// A request that failed.
pub fn request(py: Python<'_>, e: &CoreRequest) -> PyErr {
    let subject = match e {
        CoreRequest::ServerDied { during, .. } => during.as_ref(),
        CoreRequest::InvalidPrompt { subject, .. }
        | CoreRequest::Http { subject, .. }
        | CoreRequest::Timeout { subject, .. }
        | CoreRequest::Transport { subject, .. }
        | CoreRequest::InvalidOutput { subject, .. }
        | CoreRequest::ContextExhausted { subject, .. }
        | CoreRequest::NoServerLeft { subject, .. }
        | CoreRequest::Cancelled { subject } => Some(subject),
        _ => None,
    };
    let subject = match (e, subject) {
        (CoreRequest::BadImage { path, .. }, _) => string(py, &path.display().to_string()),
        (_, Some(Subject::Frame(path))) => string(py, &path.display().to_string()),
        (_, Some(Subject::Request(id))) => string(py, id),
        _ => none(py),
    };
    let status = match e {
        CoreRequest::Http { status, .. } => status.into_pyobject(py).unwrap().into_any().unbind(),
        _ => none(py),
    };
    let death: Option<&ServerDeath> = match e {
        CoreRequest::ServerDied { death, .. } => Some(death),
        CoreRequest::NoServerLeft { last_death, .. } => Some(last_death),
        _ => None,
    };
    let mut attributes: Vec<(&str, Py<PyAny>)> = vec![
        ("kind", string(py, kind(e))),
        ("subject", subject),
        ("status", status),
    ];
    match death {
        Some(death) => attributes.extend(exit(py, death.status)),
        None => attributes.extend([("exit_code", none(py)), ("signal", none(py))]),
    }
    raise(py, "RequestError", say(e), &attributes)
}

/// A lock that could not be taken: a VRAM reading under it fails as a `VramError` (its cause
/// kept); the rest as an `InferenceError`.
pub fn lock(py: Python<'_>, e: &LockError) -> PyErr {
    match e {
        LockError::VramUnderLock(vram_error) => vram_saying(py, vram_error, say(e)),
        LockError::File { source, .. } => {
            let err = raise(py, "InferenceError", say(e), &[]);
            err.set_cause(py, Some(os_error(source)));
            err
        }
        other => raise(py, "InferenceError", say(other), &[]),
    }
}

/// Any error of the lifecycle.
pub fn engine(py: Python<'_>, e: &EngineError) -> PyErr {
    match e {
        EngineError::Config(e) => config(e.clone()),
        EngineError::Vram(e) => vram(py, e),
        EngineError::Lock(e) => lock(py, e),
        EngineError::Start(e) => start(py, e),
        EngineError::Request(e) => request(py, e),
        EngineError::Pool(pool) => match <&[_; 1]>::try_from(pool.failures.as_slice()) {
            Ok([only]) => engine(py, &only.error),
            Err(_) => raise(py, "StartError", say(pool), &[]),
        },
        other => raise(py, "InferenceError", say(other), &[]),
    }
}
