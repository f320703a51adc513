//! `cinecut-infer run`: JSONL records answered under any JSON schema, through the shared job.

use engine_core::{DescribeOptions, EngineConfig, Prompt, Schema};

use crate::cli::RunArgs;
use crate::exit::Outcome;
use crate::job::plan::{Head, Item};
use crate::job::summary::Kind;
use crate::job::{Job, execute};
use crate::records;
use crate::settings::{config, instruction, sampling};
use crate::signals::stop_on_signals;

pub fn run(args: RunArgs) -> Outcome {
    let stop = stop_on_signals();
    let setup = || -> Result<(EngineConfig, Vec<Item>), String> {
        let instruction = instruction(&args.ask)?
            .ok_or("run needs the instruction: give --prompt TEXT or --prompt-file FILE")?;
        let schema = Schema::from_file(&args.schema).map_err(|e| e.to_string())?;
        // The sampling flags are checked here, before anything starts, as `describe` checks them.
        let (temperature, max_tokens) = sampling(&args.ask, 128)?;
        let options = DescribeOptions::default()
            .retries(args.ask.retries)
            .constraint(args.ask.grammar);
        let config = config(&args.model, args.mmproj.as_deref(), &args.server, options)?;
        let ask = |record: &records::Record| {
            let text = match &record.text {
                Some(text) if !instruction.is_empty() => format!("{instruction}\n\n{text}"),
                Some(text) => text.clone(),
                None => instruction.clone(),
            };
            // Errors name a string id by its text, a number as written.
            let raw = record.id.get();
            let id = serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string());
            let mut prompt = Prompt::new(&schema, text)
                .id(id)
                .max_tokens(max_tokens)
                .temperature(temperature);
            if let Some(system) = &args.system {
                prompt = prompt.system(system.clone());
            }
            record
                .images
                .iter()
                .fold(prompt, |prompt, image| prompt.image(image))
        };
        let records = records::collect(&args.inputs)?;
        if args.mmproj.is_none()
            && let Some(record) = records.iter().find(|r| !r.images.is_empty())
        {
            return Err(format!(
                "record {} has images, but the model runs text-only — give --mmproj (a vision \
                 model), or drop the images",
                record.id.get()
            ));
        }
        let items = records
            .into_iter()
            .map(|record| Item {
                key: records::key(&record.id),
                prompt: Ok(ask(&record)),
                files: record.images.clone(),
                position: None,
                head: Head::Record {
                    id: record.id,
                    source: record.source,
                },
            })
            .collect();
        Ok((config, items))
    };
    let (config, items) = setup()?;
    let mut extra_protected = vec![args.schema.clone()];
    extra_protected.extend(args.ask.prompt_file.iter().cloned());
    let job = Job {
        inputs: &args.inputs,
        out: &args.out,
        gpus: args.server.gpus(),
        slots: args.server.slots,
        servers: args.server.servers_per_gpu,
        extra_protected,
        key_of: records::key_of_line,
        kind: Kind::Records,
    };
    execute::<serde_json::Value>(config, items, job, &stop)
}
