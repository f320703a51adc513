//! docs/scale-out.md's manifests and scripts, checked offline: the Kubernetes Jobs parse and ask for
//! what the CLI needs, the Slurm scripts pass `bash -n` and give the array's size. (No cluster is
//! reachable from CI: what ran where is in docs/scale-out.md.)

use std::path::PathBuf;
use std::process::Command;

use serde_yaml_ng::Value;

fn doc(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/scale-out")
        .join(name)
}

fn yaml(name: &str) -> Value {
    let text = std::fs::read_to_string(doc(name)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The `--flag=value` of an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{name}=")))
}

#[test]
fn the_indexed_job_gives_each_pod_one_gpu_and_its_own_shard() {
    let job = yaml("describe-job.yaml");
    assert_eq!(job["kind"], "Job");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let completions = spec["completions"].as_u64().unwrap();
    assert_eq!(spec["parallelism"].as_u64(), Some(completions));
    let container = &spec["template"]["spec"]["containers"][0];
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 1);
    let args: Vec<String> = serde_yaml_ng::from_value(container["args"].clone()).unwrap();
    assert_eq!(args[0], "describe");
    assert_eq!(
        flag(&args, "--shards").map(|n| n.parse::<u64>().unwrap()),
        Some(completions),
        "--shards must equal completions"
    );
    let output = flag(&args, "--output").unwrap();
    assert!(output.contains("$(JOB_COMPLETION_INDEX)"), "{output}");
    assert!(args.iter().any(|a| a == "--resume"));
    let mounts: Vec<String> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_string())
        .collect();
    assert!(
        mounts.iter().any(|m| output.starts_with(m.as_str())),
        "{mounts:?}"
    );
    let env = container["env"].as_sequence().unwrap();
    assert!(env.iter().any(|e| e["name"] == "CINECUT_MODELS_DIR"));

    let merge = yaml("merge-job.yaml");
    let command = merge["spec"]["template"]["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    assert!(command.starts_with("cinecut-infer merge "), "{command}");
}

#[test]
fn the_slurm_scripts_parse_and_the_array_gives_the_shard_count() {
    for script in ["describe-array.sbatch", "merge.sbatch"] {
        let status = Command::new("bash")
            .arg("-n")
            .arg(doc(script))
            .status()
            .unwrap();
        assert!(status.success(), "{script} has a syntax error");
    }
    let text = std::fs::read_to_string(doc("describe-array.sbatch")).unwrap();
    let array = text
        .lines()
        .find_map(|l| l.strip_prefix("#SBATCH --array="))
        .expect("an --array line");
    let (first, last) = array.split_once('-').unwrap();
    assert_eq!(
        first, "0",
        "the shard index is the task id minus SLURM_ARRAY_TASK_MIN"
    );
    assert!(last.parse::<u32>().unwrap() > 0);
    assert!(text.contains("--gres=gpu:1"));
    assert!(text.contains("$SLURM_ARRAY_TASK_ID.jsonl"));
    assert!(text.contains("--resume"));
}
