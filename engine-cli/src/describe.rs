//! `cinecut-infer describe`: frames (files, folders, `.jsonl` KeyframeRecords) into SceneDescription
//! lines, through the shared job.

use engine_core::{DescribeOptions, EngineConfig, SceneDescription};

use crate::cli::{DEFAULT_MMPROJ, DEFAULT_MODEL, DescribeArgs};
use crate::exit::Outcome;
use crate::frames;
use crate::job::plan::{Head, Item};
use crate::job::summary::Kind;
use crate::job::{Job, execute};
use crate::settings::{config, instruction, model_path, sampling};
use crate::signals::stop_on_signals;

pub fn describe(args: DescribeArgs) -> Outcome {
    // From the first moment: a signal while waiting for the lock or the model still cleans up.
    let stop = stop_on_signals();
    let setup = || -> Result<(EngineConfig, Vec<Item>), String> {
        let model = model_path(args.model.clone(), DEFAULT_MODEL, "--model")?;
        let mmproj = model_path(args.mmproj.clone(), DEFAULT_MMPROJ, "--mmproj")?;
        let (temperature, max_tokens) = sampling(&args.ask, 512)?;
        let mut options = DescribeOptions::default()
            .temperature(temperature)
            .retries(args.ask.retries)
            .constraint(args.ask.grammar)
            .max_tokens(max_tokens);
        if let Some(prompt) = instruction(&args.ask)? {
            options = options.prompt(prompt);
        }
        let config = config(&model, Some(&mmproj), &args.server, options)?;
        let items = frames::collect(&args.frames)?
            .into_iter()
            .map(|frame| frame_item(frame, config.describe_options()))
            .collect();
        Ok((config, items))
    };
    let (config, items) = setup()?;
    let job = Job {
        inputs: &args.frames,
        out: &args.out,
        gpus: args.server.gpus(),
        slots: args.server.slots,
        servers: args.server.servers_per_gpu,
        extra_protected: args.ask.prompt_file.iter().cloned().collect(),
        key_of: frames::key_of_line,
        kind: Kind::Frames,
    };
    execute::<SceneDescription>(config, items, job, &stop)
}

/// A frame as an item: named by its path, resumed by its canonical path.
fn frame_item(frame: frames::Frame, options: &DescribeOptions) -> Item {
    let prompt = match frame.path.to_str() {
        Some(_) => Ok(options.frame_prompt(&frame.path)),
        None => Err(format!(
            "file name {:?} is not UTF-8, which a JSON line cannot hold — rename the file",
            frame.path
        )),
    };
    Item {
        key: frames::key(&frame.path),
        head: Head::Frame {
            frame_path: frame.path.to_string_lossy().into_owned(),
            timestamp_s: frame.timestamp_s,
            source: frame.source,
        },
        prompt,
        files: vec![frame.path],
        position: None,
    }
}
