//! A minimal GGUF (version 3) writer: metadata key/values and F32 tensors, enough for the tiny model.
//! Layout: header, key/values, tensor infos, padding to the alignment, tensor data (each aligned).

use std::io::{self, Write};

const ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrI32(Vec<i32>),
    ArrF32(Vec<f32>),
}

// GGUF value type ids.
const T_INT32: u32 = 5;
const T_UINT32: u32 = 4;
const T_FLOAT32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// A tensor: its name, its shape in ggml order (`ne[0]` is the row length), and its F32 data.
#[derive(Debug)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub data: Vec<f32>,
}

/// A GGUF file under construction.
#[derive(Debug, Default)]
pub struct Gguf {
    kv: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Gguf {
    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        self.kv.push((key.to_string(), value));
        self
    }

    pub fn tensor(&mut self, name: &str, shape: &[u64], data: Vec<f32>) -> &mut Self {
        let elements: u64 = shape.iter().product();
        assert_eq!(
            elements as usize,
            data.len(),
            "tensor {name}: shape and data disagree"
        );
        self.tensors.push(Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            data,
        });
        self
    }

    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (key, value) in &self.kv {
            write_str(&mut head, key);
            match value {
                Value::U32(v) => {
                    head.extend_from_slice(&T_UINT32.to_le_bytes());
                    head.extend_from_slice(&v.to_le_bytes());
                }
                Value::F32(v) => {
                    head.extend_from_slice(&T_FLOAT32.to_le_bytes());
                    head.extend_from_slice(&v.to_le_bytes());
                }
                Value::Bool(v) => {
                    head.extend_from_slice(&T_BOOL.to_le_bytes());
                    head.push(u8::from(*v));
                }
                Value::Str(v) => {
                    head.extend_from_slice(&T_STRING.to_le_bytes());
                    write_str(&mut head, v);
                }
                Value::ArrStr(items) => {
                    head.extend_from_slice(&T_ARRAY.to_le_bytes());
                    head.extend_from_slice(&T_STRING.to_le_bytes());
                    head.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for item in items {
                        write_str(&mut head, item);
                    }
                }
                Value::ArrI32(items) => {
                    head.extend_from_slice(&T_ARRAY.to_le_bytes());
                    head.extend_from_slice(&T_INT32.to_le_bytes());
                    head.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for item in items {
                        head.extend_from_slice(&item.to_le_bytes());
                    }
                }
                Value::ArrF32(items) => {
                    head.extend_from_slice(&T_ARRAY.to_le_bytes());
                    head.extend_from_slice(&T_FLOAT32.to_le_bytes());
                    head.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for item in items {
                        head.extend_from_slice(&item.to_le_bytes());
                    }
                }
            }
        }
        let mut offset = 0usize;
        for tensor in &self.tensors {
            write_str(&mut head, &tensor.name);
            head.extend_from_slice(&(tensor.shape.len() as u32).to_le_bytes());
            for dim in &tensor.shape {
                head.extend_from_slice(&dim.to_le_bytes());
            }
            head.extend_from_slice(&0u32.to_le_bytes()); // GGML_TYPE_F32
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += (tensor.data.len() * 4).next_multiple_of(ALIGNMENT);
        }
        head.resize(head.len().next_multiple_of(ALIGNMENT), 0);
        out.write_all(&head)?;
        for tensor in &self.tensors {
            let mut bytes: Vec<u8> = tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            bytes.resize(bytes.len().next_multiple_of(ALIGNMENT), 0);
            out.write_all(&bytes)?;
        }
        Ok(())
    }
}
