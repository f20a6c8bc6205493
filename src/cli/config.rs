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
/// What the command line parser knows of an option: its long name and
/// whether it takes a value.
pub type Lookup<'a> = &'a dyn Fn(&str, &str) -> Option<(String, bool)>;

/// `lookup(sub, "--long" | "-s")` describes subcommand `sub`'s option.
pub fn expand(args: Vec<OsString>, lookup: Lookup) -> Result<Vec<OsString>, Error> {
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
    // The options and the number of paths the command line gives.
    let (mut given, mut paths) = (Vec::new(), 0);
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].to_string_lossy();
        if a == "--" {
            paths += rest.len() - i - 1;
            break;
        }
        if a.starts_with('-') && a.len() > 1 {
            let name = a.split('=').next().unwrap_or(&a);
            if let Some((long, value)) = lookup(sub, name) {
                given.push(long);
                if value && !a.contains('=') && !(name.len() == 2 && a.len() > 2) {
                    i += 1;
                }
            }
        } else {
            paths += 1;
        }
        i += 1;
    }
    let train = sub == "train";
    let keep = |name: &str| train || lookup(sub, &format!("--{name}")).is_some();
    let (table, file_paths) = options(&file, &given, &keep)?;
    let mut out: Vec<OsString> = args[..2].to_vec();
    // The file's paths fill in what the command line leaves out: both when
    // it gives none, the model before a lone DATA.
    match (paths, train) {
        (0, true) => out.extend(file_paths.model.into_iter().chain(file_paths.data)),
        (0, false) | (1, true) => out.extend(file_paths.model),
        _ => {}
    }
    out.extend(table);
    out.extend(rest);
    Ok(out)
}

/// The `model` and `data` paths of a config file.
struct Paths {
    model: Option<OsString>,
    data: Option<OsString>,
}

/// The file's options as `--name=value` arguments, skipping the options in
/// `given` (long names) and those `keep` refuses, and its paths.
fn options(
    file: &Path,
    given: &[String],
    keep: &dyn Fn(&str) -> bool,
) -> Result<(Vec<OsString>, Paths), Error> {
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
    let path = |key: &str| -> Result<Option<OsString>, Error> {
        table
            .get(key)
            .map(|v| scalar(key, v).map(OsString::from))
            .transpose()
    };
    let paths = Paths {
        model: path("model")?,
        data: path("data")?,
    };
    let mut out = Vec::new();
    for (key, v) in &table {
        if key == "model" || key == "data" {
            continue;
        }
        let name = key.replace('_', "-");
        if name == "config" {
            return Err(bad(key, "a config file cannot name another"));
        }
        if v.is_table() {
            return Err(bad(key, "tables are not options"));
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
                out.push(format!("--{name}={}", parts.join(",")).into());
            }
            toml::Value::Table(_) => return Err(bad(key, "tables are not options")),
            other => out.push(format!("--{name}={}", scalar(key, other)?).into()),
        }
    }
    Ok((out, paths))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    /// `train`'s and `plan`'s options as the tests need them.
    fn lookup(sub: &str, name: &str) -> Option<(String, bool)> {
        let long = match name {
            "-o" => "out",
            n => n.strip_prefix("--")?,
        };
        let known = [
            "out",
            "method",
            "lr",
            "rslora",
            "virtual-tokens",
            "train-on-prompt",
        ];
        if !known.contains(&long) || (sub == "plan" && long == "out") {
            return None;
        }
        Some((
            long.to_string(),
            !matches!(long, "rslora" | "train-on-prompt"),
        ))
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn a_config_file_becomes_options_the_command_line_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("run.toml");
        std::fs::write(
            &f,
            "model = \"m.gguf\"\ndata = \"notes.txt\"\nmethod = [\"lora\", \"prompt\"]\n\
             lr = -0.5\nrslora = true\ntrain_on_prompt = false\nvirtual_tokens = 8\nout = \"runs/a\"\n",
        )
        .unwrap();
        let cfg = f.to_str().unwrap();
        // The command line's -o and --lr win; the file's paths come first.
        let args = os(&[
            "edgetune", "train", "--config", cfg, "--lr", "0.01", "-o", "x",
        ]);
        let want = [
            "edgetune",
            "train",
            "m.gguf",
            "notes.txt",
            "--method=lora,prompt",
            "--rslora",
            "--virtual-tokens=8",
            "--lr",
            "0.01",
            "-o",
            "x",
        ];
        assert_eq!(strings(expand(args, &lookup).unwrap()), want);
        // A lone DATA on the command line gets the file's model before it.
        let args = os(&["edgetune", "train", "other.txt", "--config", cfg]);
        let got = strings(expand(args, &lookup).unwrap());
        assert_eq!(&got[2..3], ["m.gguf"]);
        assert_eq!(got.last().unwrap(), "other.txt");
        // plan takes the model, not the data, nor the options it lacks.
        let args = os(&["edgetune", "plan", "--config", cfg]);
        let want = [
            "edgetune",
            "plan",
            "m.gguf",
            "--lr=-0.5",
            "--method=lora,prompt",
            "--rslora",
            "--virtual-tokens=8",
        ];
        assert_eq!(strings(expand(args, &lookup).unwrap()), want);
        // Other commands and runs without --config are untouched.
        let plain = os(&["edgetune", "generate", "--config", "x"]);
        assert_eq!(expand(plain.clone(), &lookup).unwrap(), plain);
        // Tables are refused by key.
        std::fs::write(&f, "[lora]\nrank = 4\n").unwrap();
        let args = os(&["edgetune", "plan", "--config", cfg]);
        let e = expand(args, &lookup).unwrap_err().to_string();
        assert!(e.contains("lora: tables are not options"), "{e}");
    }
}
