use clap::Parser;

fn main() {
    let cli = ttarag::cli::Cli::parse();
    if let Err(e) = ttarag::cli::run(cli) {
        // One line with the cause chain; details are in the log.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
