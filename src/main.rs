//! The `edgetune` command. Every command is a thin layer over library calls.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
