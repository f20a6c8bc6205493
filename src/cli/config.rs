//! `--config FILE` for `train` and `plan`: a TOML file of the command's
//! options, so a run can be written down, versioned and repeated.
//!
//! ```toml
//! model = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! data = "examples/data/notes.txt"
//! out = "runs/notes"
//! method = ["lora", "prompt"]   # or "lora,prompt"
//! rank = 16
//! lr = 1e-3
//! virtual-tokens = 8            # or virtual_tokens
//! rslora = true                 # a flag: true sets it
//! ```
//!
//! Every key is a long option of the command (kebab- or snake-case), plus
//! `model` and `data` for the positional paths. An option also given on the
//! command line takes the command line's value. The file's options are
//! turned into arguments, so they are checked exactly as typed options are.
//! `plan` reads a `train` file: it passes over `data` and the options it
//! does not have (`out`, `steps`, …).

use edgetune::Error;
use std::ffi::OsString;
use std::path::Path;

/// The command's arguments with a `--config FILE` (of `train` or `plan`)
/// replaced by the file's options; other arguments are returned unchanged.
/// `has(sub, long)` says whether subcommand `sub` has option `--long`.
pub fn expand(
    args: Vec<OsString>,
    has: &dyn Fn(&str, &str) -> bool,
) -> Result<Vec<OsString>, Error> {
    let sub = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    if !matches!(sub, "train" | "plan") {
        return Ok(args);
    }
    let mut rest: Vec<OsString> = Vec::new();
    let mut file = None;
    let mut it = args[2..].iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            let f = it
                .next()
                .ok_or_else(|| Error::Invalid("--config needs a FILE".into()))?;
            file = Some(std::path::PathBuf::from(f));
        } else if let Some(f) = s.strip_prefix("--config=") {
            file = Some(std::path::PathBuf::from(f));
        } else {
            rest.push(a.clone());
        }
    }
    let Some(file) = file else {
        return Ok(args);
    };
    let given: Vec<String> = rest
        .iter()
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect();
    let mut out: Vec<OsString> = args[..2].to_vec();
    let train = sub == "train";
    let keep = |name: &str| train || has(sub, name);
    out.extend(options(&file, &given, train, &keep)?);
    out.extend(rest);
    Ok(out)
}

/// The file's options as arguments, positional paths first (`data` only
/// when `with_data`), skipping the options in `given` (long names without
/// `--`) and those `keep` refuses.
fn options(
    file: &Path,
    given: &[String],
    with_data: bool,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<OsString>, Error> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| Error::Invalid(format!("{}: {e}", file.display())))?;
    let bad = |key: &str, msg: &str| Error::Invalid(format!("{}: {key}: {msg}", file.display()));
    let scalar = |key: &str, v: &toml::Value| -> Result<String, Error> {
        Ok(match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => return Err(bad(key, "expected a string, number or boolean")),
        })
    };
    let mut positional = Vec::new();
    let paths: &[&str] = if with_data {
        &["model", "data"]
    } else {
        &["model"]
    };
    for &key in paths {
        if let Some(v) = table.get(key) {
            positional.push(OsString::from(scalar(key, v)?));
        }
    }
    let mut out = positional;
    for (key, v) in &table {
        if key == "model" || key == "data" {
            continue;
        }
        let name = key.replace('_', "-");
        if name == "config" {
            return Err(bad(key, "a config file cannot name another"));
        }
        if given.contains(&name) || !keep(&name) {
            continue;
        }
        match v {
            toml::Value::Boolean(true) => out.push(format!("--{name}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                let parts = items
                    .iter()
                    .map(|i| scalar(key, i))
                    .collect::<Result<Vec<_>, _>>()?;
                out.push(format!("--{name}").into());
                out.push(parts.join(",").into());
            }
            toml::Value::Table(_) => return Err(bad(key, "tables are not options")),
            other => {
                out.push(format!("--{name}").into());
                out.push(scalar(key, other)?.into());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_config_file_becomes_options_the_command_line_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("run.toml");
        std::fs::write(
            &f,
            "data = \"notes.txt\"\nmethod = [\"lora\", \"prompt\"]\nlr = 0.001\nrslora = true\n\
             train_on_prompt = false\nvirtual_tokens = 8\nout = \"runs/a\"\n",
        )
        .unwrap();
        let args = os(&[
            "edgetune",
            "train",
            "--config",
            f.to_str().unwrap(),
            "--lr",
            "0.01",
        ]);
        let has = |_: &str, long: &str| long != "out";
        let got: Vec<String> = expand(args, &has)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let want = [
            "edgetune",
            "train",
            "notes.txt",
            "--method",
            "lora,prompt",
            "--out",
            "runs/a",
            "--rslora",
            "--virtual-tokens",
            "8",
            "--lr",
            "0.01",
        ];
        assert_eq!(got, want);
        // Other commands and runs without --config are untouched.
        let plain = os(&["edgetune", "generate", "--config", "x"]);
        assert_eq!(expand(plain.clone(), &has).unwrap(), plain);
        // plan passes over data and the options it does not have.
        let args = os(&["edgetune", "plan", "--config", f.to_str().unwrap()]);
        let got: Vec<String> = expand(args, &has)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let want = [
            "edgetune",
            "plan",
            "--lr",
            "0.001",
            "--method",
            "lora,prompt",
            "--rslora",
            "--virtual-tokens",
            "8",
        ];
        assert_eq!(got, want);
        // Unknown value kinds are refused by key.
        std::fs::write(&f, "[lora]\nrank = 4\n").unwrap();
        let args = os(&["edgetune", "plan", "--config", f.to_str().unwrap()]);
        let e = expand(args, &has).unwrap_err().to_string();
        assert!(e.contains("lora: tables are not options"), "{e}");
    }
}
