//! Values across the boundary as Python objects, never JSON text: an answer, a summary or a schema
//! becomes dicts, lists, strings and numbers (pythonize, PyO3's serde bridge), and a Python object
//! the engine reads (a schema, a value to validate) becomes a serde value.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use serde::Serialize;

/// The package's module of the classes that cross the boundary (`cinecut_engine._types`: the
/// exceptions and `SceneDescription`), imported once.
pub fn types(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static TYPES: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    TYPES
        .get_or_try_init(py, || Ok(py.import("cinecut_engine._types")?.unbind()))
        .map(|m| m.bind(py))
}

/// A `SceneDescription` (the package's frozen dataclass) of `scene`.
pub fn scene<'py>(
    py: Python<'py>,
    scene: &engine_core::SceneDescription,
) -> PyResult<Bound<'py, PyAny>> {
    let kwargs = to_python(py, scene)?;
    types(py)?
        .getattr("SceneDescription")?
        .call((), Some(kwargs.cast::<pyo3::types::PyDict>()?))
}

/// `value` as Python objects.
pub fn to_python<'py>(py: Python<'py>, value: &impl Serialize) -> PyResult<Bound<'py, PyAny>> {
    pythonize::pythonize(py, value).map_err(PyErr::from)
}

/// A Python object as a JSON value; a `ValueError` names what JSON cannot hold (NaN, a lone
/// surrogate, a set).
pub fn from_python(object: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    let value: serde_json::Value = pythonize::depythonize(object)
        .map_err(|e| PyValueError::new_err(format!("not JSON: {e}")))?;
    // JSON has no NaN or infinity; serde reads them as null, which would pass for a value.
    if has_null_for_a_float(object)? {
        return Err(PyValueError::new_err(
            "not JSON: NaN and infinity are no JSON numbers",
        ));
    }
    Ok(value)
}

/// Whether a float anywhere in `object` is NaN or infinite.
fn has_null_for_a_float(object: &Bound<'_, PyAny>) -> PyResult<bool> {
    if let Ok(number) = object.extract::<f64>()
        && object.is_instance_of::<pyo3::types::PyFloat>()
    {
        return Ok(!number.is_finite());
    }
    if let Ok(dict) = object.cast::<pyo3::types::PyDict>() {
        for value in dict.values() {
            if has_null_for_a_float(&value)? {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    if object.is_instance_of::<pyo3::types::PyList>()
        || object.is_instance_of::<pyo3::types::PyTuple>()
    {
        for item in object.try_iter()? {
            if has_null_for_a_float(&item?)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
