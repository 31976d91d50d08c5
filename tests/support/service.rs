//! The command line of the service that a test or a bench builds in its own
//! process (`Application::build`): what every such service gets, whatever
//! else it is given.

use ai_secretary::cli::Cli;
use clap::Parser;

/// The abuse limits, off unless the options set one: tests send bursts from
/// one address and load tests measure the service, not its limits.
const LIMITS: [&str; 3] = [
    "--rate-limit-commands-per-minute",
    "--rate-limit-signups-per-hour",
    "--rate-limit-logins-per-minute",
];

/// The service's configuration from `options`, bound to a free port of
/// 127.0.0.1, in development, with every limit `options` does not set off.
pub fn command_line(options: &[&str]) -> Result<Cli, clap::Error> {
    let mut args = vec![
        "ai-secretary",
        "--bind",
        "127.0.0.1:0",
        "--environment",
        "development",
    ];
    for limit in LIMITS {
        if !options.contains(&limit) {
            args.extend([limit, "0"]);
        }
    }
    args.extend_from_slice(options);
    Cli::try_parse_from(args)
}
