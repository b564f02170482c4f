//! `init` and `import`: the commands that write config files from what Azure gives.
//!
//! In: a few answers as flags (`init`), or the workspace's
//! outbound-dependencies JSON (`import aml-dependencies`). Out: a commented
//! config (and a `rules.d/` file of imported rules) that compiles, on stdout
//! or in files. Nothing is written unless the whole result compiles, and an
//! existing file is replaced only with `--force` (`init`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;

use crate::config::{Config, Included, Source};
use crate::import::{self, Imported};
use crate::policy::{CompileInput, Policy, Severity};
use crate::servicetags::ServiceTags;

/// `portcullis init` flags (`--service-tags` is the global one).
#[derive(Debug, Args)]
pub(super) struct InitArgs {
    /// Workspace region, e.g. westeurope.
    #[arg(long)]
    region: String,
    /// The workspace's default storage account name.
    #[arg(long)]
    storage: String,
    /// The workspace's container registry name.
    #[arg(long)]
    acr: String,
    /// Workspace ID (portal: workspace, Properties); used by the kubernetes scenario.
    #[arg(long)]
    workspace_id: Option<String>,
    /// VNet address space, e.g. 10.0.0.0/16 (private endpoints live in it).
    #[arg(long)]
    vnet: String,
    /// The compute subnet, the only clients served, e.g. 10.0.2.0/24.
    #[arg(long)]
    compute_subnet: String,
    /// The workspace's outbound-dependencies JSON: imported into rules.d/ beside --out, or inlined on stdout.
    #[arg(long, value_name = "FILE")]
    dependencies: Option<PathBuf>,
    /// Write the config here instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace files that exist.
    #[arg(long)]
    force: bool,
}

/// `portcullis import` sources.
#[derive(Debug, Subcommand)]
pub(super) enum ImportCmd {
    /// Rules from an Azure ML workspace's outbound-dependencies list (JSON).
    AmlDependencies {
        /// The JSON the workspace's outboundNetworkDependenciesEndpoints API returned.
        file: PathBuf,
        /// Write the rules here (replaced if it exists) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// The file the imported rules go to, beside the config.
const RULES_D_FILE: &str = "rules.d/aml-dependencies.toml";

/// Reads and converts a dependencies file; notes go to stderr.
fn import_file(file: &Path) -> Result<Imported> {
    let json =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let origin = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().to_string(),
    );
    let imported = import::aml_dependencies(&json, &origin)
        .with_context(|| format!("{}: not an outbound-dependencies list", file.display()))?;
    for note in &imported.notes {
        eprintln!("note: {}: {note}", file.display());
    }
    Ok(imported)
}

/// `portcullis import aml-dependencies FILE [--out FILE]`.
pub(super) fn import(cmd: &ImportCmd) -> Result<ExitCode> {
    let ImportCmd::AmlDependencies { file, out } = cmd;
    let imported = import_file(file)?;
    let name = out
        .as_ref()
        .map_or("<stdout>".into(), |p| p.display().to_string());
    compile_or_bail(
        "[policy]\nprofile = \"none\"\n",
        "<import check>",
        Some((&name, &imported.text)),
        None,
    )?;
    match out {
        Some(path) => {
            write_file(path, &imported.text)?;
            eprintln!(
                "wrote {}: {} rule(s), {} endpoint:port pair(s)",
                path.display(),
                imported.rules,
                imported.endpoints
            );
        }
        None => print!("{}", imported.text),
    }
    Ok(ExitCode::SUCCESS)
}

/// `portcullis init`: writes a config (and the imported rules) that compiles.
pub(super) fn init(args: &InitArgs, service_tags: Option<&Path>) -> Result<ExitCode> {
    let vnet: IpNet = (args.vnet.parse())
        .with_context(|| format!("--vnet '{}' is not a CIDR (10.0.0.0/16)", args.vnet))?;
    let subnet: IpNet = (args.compute_subnet.parse()).with_context(|| {
        format!(
            "--compute-subnet '{}' is not a CIDR (10.0.2.0/24)",
            args.compute_subnet
        )
    })?;
    if !vnet.contains(&subnet) {
        eprintln!("warning: --compute-subnet {subnet} is not inside --vnet {vnet}");
    }
    let tags = match service_tags {
        Some(p) => Some(std::path::absolute(p).context("cannot resolve --service-tags")?),
        None => None,
    };
    let deps = args.dependencies.as_deref().map(import_file).transpose()?;
    let rules_file = match (&args.out, &deps) {
        (Some(out), Some(_)) => Some(out.parent().unwrap_or(Path::new("")).join(RULES_D_FILE)),
        _ => None,
    };
    let mut text = config_text(
        args,
        tags.as_deref(),
        deps.is_some() && rules_file.is_some(),
    )?;
    if let (Some(d), None) = (&deps, &rules_file) {
        text.push_str("\n# The workspace's outbound-dependencies list (portcullis import aml-dependencies).\n");
        text.push_str(&d.text);
    }
    let name = args
        .out
        .as_ref()
        .map_or("<stdout>".into(), |p| p.display().to_string());
    let included = (rules_file.as_ref().zip(deps.as_ref()))
        .map(|(p, d)| (p.display().to_string(), d.text.as_str()));
    let included = included.as_ref().map(|(n, t)| (n.as_str(), *t));
    compile_or_bail(&text, &name, included, tags.as_deref())?;
    let Some(out) = &args.out else {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    };
    for path in std::iter::once(out).chain(rules_file.as_ref()) {
        if path.exists() && !args.force {
            bail!("{} exists: pass --force to replace it", path.display());
        }
    }
    if let (Some(path), Some(d)) = (&rules_file, &deps) {
        write_file(path, &d.text)?;
        eprintln!("wrote {} ({} rule(s))", path.display(), d.rules);
    }
    write_file(out, &text)?;
    // Other files already in rules.d/ are included too: check the whole.
    if let Err(e) = crate::load::load(Some(out), &[], None, 0) {
        bail!(
            "wrote {}, but with the files beside it it does not pass `check`:\n{e}",
            out.display()
        );
    }
    eprintln!(
        "wrote {}: check it with `portcullis check -c {}`",
        out.display(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Compiles a config text (and one included file) as `check` would; every
/// error is an error here, so nothing that fails `check` is written.
fn compile_or_bail(
    text: &str,
    name: &str,
    included: Option<(&str, &str)>,
    tags: Option<&Path>,
) -> Result<()> {
    let source = Source {
        name: name.to_string(),
        text: text.to_string(),
    };
    let mut config = Config::parse(&source)?;
    if let Some((inc_name, inc_text)) = included {
        let inc = Source {
            name: inc_name.to_string(),
            text: inc_text.to_string(),
        };
        config.included.push(Included::parse(inc, 0)?);
    }
    let tags = tags.map(ServiceTags::load).transpose()?;
    let input = CompileInput {
        service_tags: tags.as_ref(),
        ..CompileInput::default()
    };
    if let Err(diags) = Policy::compile(&config, &source, &input) {
        let errors: Vec<String> = (diags.iter())
            .filter(|d| d.severity == Severity::Error)
            .map(ToString::to_string)
            .collect();
        bail!("the result would not pass `check`:\n{}", errors.join("\n"));
    }
    Ok(())
}

/// Writes a file, creating its folder: the text goes to `FILE.tmp` first,
/// then replaces the file in one rename, so a reader never sees half of it.
/// A replaced file's mode, owner and group carry over (the package's
/// `root:portcullis 0640`); a new file gets mode 0640.
fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    keep_access(path, &tmp).with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// Gives `tmp` the mode, owner and group of `path` if it exists (owner and
/// group only where this process may), else mode 0640.
fn keep_access(path: &Path, tmp: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(meta) => {
            std::fs::set_permissions(tmp, meta.permissions())?;
            // Only root may give a file away; anyone else keeps their own.
            let _ = std::os::unix::fs::chown(tmp, Some(meta.uid()), Some(meta.gid()));
            Ok(())
        }
        Err(_) => std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o640)),
    }
}

/// A TOML basic string.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The config text: every choice with the reason for it.
fn config_text(args: &InitArgs, tags: Option<&Path>, include: bool) -> Result<String> {
    let mut t = String::new();
    writeln!(
        t,
        "# portcullis for an Azure Machine Learning workspace, written by `portcullis init`.\n\
         # Check it:  portcullis check -c THIS_FILE\n\
         # Ask it:    portcullis explain -c THIS_FILE pypi.org:443\n\
         # The Azure side (subnets, NSG, route table, proxy settings): deploy/README.md.\n\
         \n\
         # Placeholders of the built-in Azure ML profile's rules (`portcullis profile show`).\n\
         [vars]"
    )?;
    let var = |t: &mut String, key: &str, value: Option<&str>, why: &str| {
        let line = match value {
            Some(v) => format!("{key} = {}", q(v)),
            None => format!("# {key} = \"...\""),
        };
        writeln!(t, "{line:<40} # <{key}>: {why}")
    };
    var(
        &mut t,
        "region",
        Some(&args.region),
        "Batch and Storage.<region> rules for compute",
    )?;
    var(
        &mut t,
        "storage",
        Some(&args.storage),
        "the workspace's default storage account",
    )?;
    var(
        &mut t,
        "acr",
        Some(&args.acr),
        "the workspace's container registry (custom images)",
    )?;
    let why = "the kubernetes scenario's hosts (portal: workspace, Properties)";
    var(&mut t, "workspace_id", args.workspace_id.as_deref(), why)?;
    let why = "the VNet; its private endpoints are reached by address";
    var(&mut t, "vnet", Some(&args.vnet), why)?;
    writeln!(
        t,
        "\n\
         [listen]\n\
         proxy = \"0.0.0.0:3128\"         # explicit proxy: compute's HTTP_PROXY/HTTPS_PROXY point here\n\
         transparent = \"0.0.0.0:3129\"   # routed traffic, redirected here by `portcullis render nftables`\n\
         admin = \"0.0.0.0:9090\"         # /metrics /healthz /readyz: let only Prometheus reach it (NSG)\n\
         \n\
         [admin]\n\
         # /readyz answers 503 while the nftables ruleset (portcullis-nftables.service)\n\
         # is not loaded, so a load balancer sends no flows to a gateway that would drop them.\n\
         require_ruleset = true\n\
         \n\
         [clients]\n\
         # Only the compute subnet is served: portcullis is never an open proxy.\n\
         allow = [{}]\n",
        q(&args.compute_subnet)
    )?;
    policy_text(&mut t, tags, include)?;
    writeln!(
        t,
        "\n# Policy tests: `portcullis check` fails when one does not hold.\n\
         [[expect]]\n\
         dest = \"pypi.org:443\"\n\
         verdict = \"allow\"\n\
         \n\
         [[expect]]\n\
         dest = {}\n\
         verdict = \"allow\"\n\
         \n\
         [[expect]]\n\
         dest = \"example.com:443\"        # anything no rule names is denied\n\
         verdict = \"deny\"\n\
         \n\
         [[expect]]\n\
         dest = \"169.254.169.254:80\"     # instance metadata: never through the gateway\n\
         verdict = \"deny\"",
        q(&format!("{}.blob.core.windows.net:443", args.storage))
    )?;
    Ok(t)
}

/// `[policy]`: mode, the profile's scenarios (each explained), service tags, include.
fn policy_text(t: &mut String, tags: Option<&Path>, include: bool) -> Result<()> {
    let profile = crate::load::load(None, &[], None, 0).map_err(|e| anyhow::anyhow!("{e}"))?;
    writeln!(
        t,
        "[policy]\n\
         # \"audit\" lets would-be denials through, logged and counted as audit_deny:\n\
         # run a week in audit, read the denials, then enforce.\n\
         mode = \"enforce\"\n\
         profile = \"azureml\"             # every host, port and tag of Microsoft's Azure ML network document\n\
         # Scenarios (`portcullis profile list`): on, what a workspace needs in any case;"
    )?;
    writeln!(t, "# off, add them when you use them:")?;
    let mut on = Vec::new();
    for s in profile.policy.scenarios() {
        let mark = if s.enabled { "on " } else { "off" };
        writeln!(t, "#   {mark} {:<17} {}", s.name, s.description)?;
        if s.enabled {
            on.push(q(&s.name));
        }
    }
    writeln!(t, "scenarios = [{}]", on.join(", "))?;
    match tags {
        Some(p) => writeln!(
            t,
            "# Azure IP ranges by service tag (`az network list-service-tags --location REGION`,\n\
             # or the weekly ServiceTags_Public_*.json): UDP 5831, SMB 445 and other traffic\n\
             # without a name is decided by these.\n\
             service_tags = {}",
            q(&p.display().to_string())
        )?,
        None => writeln!(
            t,
            "# Service tags decide traffic without a name (UDP 5831, SMB 445); until a file is\n\
             # given, their rules wait (`check` lists them). Download it with\n\
             # `az network list-service-tags --location REGION > ServiceTags.json`, then:\n\
             # service_tags = \"ServiceTags.json\"   # relative to this file"
        )?,
    }
    if include {
        writeln!(
            t,
            "# The workspace's own outbound-dependencies list, imported by\n\
             # `portcullis import aml-dependencies deps.json --out {RULES_D_FILE}`.\n\
             include = [\"rules.d/*.toml\"]"
        )?;
    }
    Ok(())
}
