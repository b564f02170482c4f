//! The embedded Azure ML profile against its source document: every host,
//! port, protocol and service tag of the seed is allowed in its scenario, and
//! nothing else is.

use portcullis::config::{Config, Protocol, Source};
use portcullis::policy::{CompileInput, Dest, Policy, Reason, RuleState, Target, Verdict};
use portcullis::servicetags::ServiceTags;

const ALL: &[&str] = &[
    "basic",
    "python-packages",
    "rstudio",
    "storage-firewall",
    "hbi-workspace",
    "kubernetes",
    "public-ip",
    "vscode",
    "monitoring",
];

const TAGS: &str = include_str!("data/servicetags-public-subset.json");

/// With `region = "eastus"` the service tags test data is loaded (it holds the
/// EastUS regional tags); other regions compile without it.
fn policy(scenarios: &[&str], region: &str) -> Policy {
    let text = format!(
        r#"
[vars]
region = "{region}"
storage = "mlstore"
acr = "myacr"
workspace_id = "1234abcd"
vnet = "10.0.0.0/16"
paired_region = "centralus"
[policy]
scenarios = [{}]
"#,
        scenarios
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let source = Source {
        name: "t.toml".into(),
        text,
    };
    let config = Config::parse(&source).unwrap();
    let tags = ServiceTags::parse("tags.json", TAGS).unwrap();
    let input = CompileInput {
        service_tags: (region == "eastus").then_some(&tags),
        ..CompileInput::default()
    };
    match Policy::compile(&config, &source, &input) {
        Ok((p, _)) => p,
        Err(e) => panic!("{e:#?}"),
    }
}

fn verdict(p: &Policy, host: &str, port: u16, proto: Protocol) -> Verdict {
    p.decide(&Dest {
        target: Target::parse(host),
        port,
        proto,
    })
    .verdict
}

/// (scenario, host as a client would send it, ports, protocol) straight from the seed document.
const SEED: &[(&str, &str, &[u16], Protocol)] = {
    use Protocol::*;
    &[
        // General Azure hosts
        ("basic", "login.microsoftonline.com", &[80, 443], Tcp),
        ("basic", "management.azure.com", &[443], Tcp),
        // Azure Machine Learning hosts
        ("basic", "ml.azure.com", &[443], Tcp),
        ("basic", "westus2.api.azureml.ms", &[443], Tcp),
        ("basic", "x.azureml.net", &[443], Tcp),
        ("basic", "x.modelmanagement.azureml.net", &[443], Tcp),
        ("basic", "nb1.notebooks.azure.net", &[443], Tcp),
        ("basic", "mlstore.file.core.windows.net", &[443, 445], Tcp),
        ("basic", "mlstore.dfs.core.windows.net", &[443], Tcp),
        ("basic", "mlstore.blob.core.windows.net", &[443], Tcp),
        ("basic", "graph.microsoft.com", &[443], Tcp),
        ("basic", "x.aznbcontent.net", &[443], Tcp),
        ("basic", "automlresources-prod.azureedge.net", &[443], Tcp),
        ("basic", "aka.ms", &[443], Tcp),
        // Compute instance and cluster hosts
        ("basic", "graph.windows.net", &[443], Tcp),
        ("basic", "ci1.instances.azureml.net", &[443], Tcp),
        (
            "basic",
            "ci1.instances.azureml.ms",
            &[443, 8787, 18881],
            Tcp,
        ),
        ("basic", "pool.westus2.batch.azure.com", &[443], Tcp),
        ("basic", "pool.westus2.service.batch.azure.com", &[443], Tcp),
        ("basic", "batchsa.blob.core.windows.net", &[443], Tcp),
        ("basic", "batchsa.table.core.windows.net", &[443], Tcp),
        ("basic", "batchsa.queue.core.windows.net", &[443], Tcp),
        // Azure Container Registry: "required for any custom Docker image
        // [...] also required by the internal training job submission process"
        ("basic", "myacr.azurecr.io", &[443], Tcp),
        ("basic", "myacr.westus2.data.azurecr.io", &[443], Tcp),
        // Microsoft Container Registry
        ("basic", "mcr.microsoft.com", &[443], Tcp),
        ("basic", "eastus.data.mcr.microsoft.com", &[443], Tcp),
        // Python packages
        ("python-packages", "anaconda.com", &[443], Tcp),
        ("python-packages", "repo.anaconda.com", &[443], Tcp),
        ("python-packages", "conda.anaconda.org", &[443], Tcp),
        ("python-packages", "pypi.org", &[443], Tcp),
        ("python-packages", "files.pythonhosted.org", &[443], Tcp),
        ("python-packages", "pytorch.org", &[443], Tcp),
        ("python-packages", "download.pytorch.org", &[443], Tcp),
        ("python-packages", "storage.tensorflow.org", &[443], Tcp),
        // RStudio
        ("rstudio", "ghcr.io", &[443], Tcp),
        (
            "rstudio",
            "pkg-containers.githubusercontent.com",
            &[443],
            Tcp,
        ),
        ("rstudio", "cloud.r-project.org", &[443], Tcp),
        // HBI workspace
        ("hbi-workspace", "batchkv.vault.azure.net", &[443], Tcp),
        // Kubernetes compute
        ("kubernetes", "x.kusto.windows.net", &[443], Tcp),
        ("kubernetes", "x.table.core.windows.net", &[443], Tcp),
        ("kubernetes", "x.queue.core.windows.net", &[443], Tcp),
        ("kubernetes", "myacr.azurecr.io", &[443], Tcp),
        ("kubernetes", "myacr.westus2.data.azurecr.io", &[443], Tcp),
        ("kubernetes", "mlstore.blob.core.windows.net", &[443], Tcp),
        (
            "kubernetes",
            "1234abcd.workspace.westus2.api.azureml.ms",
            &[443],
            Tcp,
        ),
        ("kubernetes", "westus2.experiments.azureml.net", &[443], Tcp),
        ("kubernetes", "westus2.api.azureml.ms", &[443], Tcp),
        ("kubernetes", "pypi.org", &[443], Tcp),
        ("kubernetes", "archive.ubuntu.com", &[80], Tcp),
        ("kubernetes", "security.ubuntu.com", &[80], Tcp),
        ("kubernetes", "ppa.launchpad.net", &[80], Tcp),
        // Visual Studio Code
        ("vscode", "insiders.vscode.dev", &[443], Tcp),
        ("vscode", "x.vscode-unpkg.net", &[443], Tcp),
        ("vscode", "main.vscode-cdn.net", &[443], Tcp),
        ("vscode", "x.vscodeexperiments.azureedge.net", &[443], Tcp),
        ("vscode", "default.exp-tas.com", &[443], Tcp),
        ("vscode", "code.visualstudio.com", &[443], Tcp),
        ("vscode", "update.code.visualstudio.com", &[443], Tcp),
        ("vscode", "az764295.vo.msecnd.net", &[443], Tcp),
        ("vscode", "marketplace.visualstudio.com", &[443], Tcp),
        ("vscode", "vscode.blob.core.windows.net", &[443], Tcp),
        ("vscode", "ms-toolsai.gallerycdn.vsassets.io", &[443], Tcp),
        ("vscode", "github.com", &[443], Tcp),
        ("vscode", "vscode.download.prss.microsoft.com", &[443], Tcp),
        (
            "vscode",
            "ci1.instances.azureml.ms",
            &[8704, 8705, 8709, 8710],
            Tcp,
        ),
        // Monitoring
        (
            "monitoring",
            "dc.applicationinsights.azure.com",
            &[443],
            Tcp,
        ),
        (
            "monitoring",
            "dc.applicationinsights.microsoft.com",
            &[443],
            Tcp,
        ),
        ("monitoring", "dc.services.visualstudio.com", &[443], Tcp),
        (
            "monitoring",
            "westus2-0.in.applicationinsights.azure.com",
            &[443],
            Tcp,
        ),
    ]
};

#[test]
fn every_seed_host_is_allowed_in_its_scenario_on_its_ports() {
    for &(scenario, host, ports, proto) in SEED {
        let only = policy(&[scenario], "westus2");
        for &port in ports {
            assert_eq!(
                verdict(&only, host, port, proto),
                Verdict::Allow,
                "{scenario}: {host}:{port}/{proto:?}"
            );
        }
        // ...and on no other port.
        let vscode_range = host.ends_with("instances.azureml.ms") && scenario == "vscode";
        for other in [22u16, 8080, 8703, 8711, 65535] {
            if !ports.contains(&other) && !vscode_range {
                assert_eq!(
                    verdict(&only, host, other, proto),
                    Verdict::Deny,
                    "{host}:{other}"
                );
            }
        }
    }
}

#[test]
fn scenario_hosts_are_denied_when_their_scenario_is_off() {
    let basic = policy(&["basic"], "westus2");
    for &(scenario, host, ports, proto) in SEED {
        let also_basic = SEED.iter().any(|&(s, h, ..)| s == "basic" && h == host);
        if scenario != "basic"
            && !also_basic
            && !host.ends_with(".core.windows.net")
            && !host.ends_with(".azureml.ms")
            && !host.ends_with(".azureml.net")
        {
            let d = basic.decide(&Dest {
                target: Target::parse(host),
                port: ports[0],
                proto,
            });
            assert_eq!(
                d.verdict,
                Verdict::Deny,
                "{host} allowed outside {scenario}"
            );
            assert_eq!(d.reason, Reason::ScenarioDisabled, "{host}");
        }
    }
}

#[test]
fn look_alikes_and_apexes_are_denied() {
    let p = policy(ALL, "westus2");
    for host in [
        "evilazureml.ms",
        "azureml.ms.evil.com",
        "azureml.ms",
        "azureml.net",
        "anaconda.org",
        "tensorflow.org",
        "pythonhosted.org",
        "blob.core.windows.net",
        "notpypi.org",
        "pypi.org.evil.com",
        "pool.eastus.batch.azure.com",
        "otherstore.file.core.windows.net",
        "otheracr.azurecr.io",
        "vscode.dev",
        "example.com",
    ] {
        assert_eq!(
            verdict(&p, host, 443, Protocol::Tcp),
            Verdict::Deny,
            "{host}"
        );
    }
    assert_eq!(
        verdict(&p, "eastus.tundra.azureml.ms", 5831, Protocol::Udp),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&p, "westus2.tundra.azureml.ms", 5831, Protocol::Tcp),
        Verdict::Deny
    );
}

fn first_v4(tags: &ServiceTags, tag: &str) -> String {
    let nets = tags
        .get(tag)
        .unwrap_or_else(|| panic!("tag {tag} in test data"));
    let net = nets
        .iter()
        .find(|n| matches!(n, ipnet::IpNet::V4(_)))
        .unwrap();
    net.hosts().next().unwrap_or(net.addr()).to_string()
}

#[test]
fn every_seed_service_tag_is_allowed_on_its_ports() {
    // The test data holds the regional tags for EastUS.
    let tags = ServiceTags::parse("tags.json", TAGS).unwrap();
    use Protocol::*;
    let cases: &[(&str, &str, &[u16], Protocol)] = &[
        ("basic", "AzureActiveDirectory", &[80, 443], Tcp),
        ("basic", "AzureMachineLearning", &[443, 8787, 18881], Tcp),
        ("basic", "AzureMachineLearning", &[5831], Udp),
        ("basic", "BatchNodeManagement.EastUS", &[443], Tcp),
        ("basic", "AzureResourceManager", &[443], Tcp),
        ("basic", "Storage.EastUS", &[443], Tcp),
        ("basic", "AzureFrontDoor.Frontend", &[443], Tcp),
        ("basic", "MicrosoftContainerRegistry", &[443], Tcp),
        ("basic", "AzureFrontDoor.FirstParty", &[443], Tcp),
        ("monitoring", "AzureMonitor", &[443], Tcp),
        ("storage-firewall", "Storage.EastUS", &[445], Tcp),
        ("hbi-workspace", "AzureKeyVault.EastUS", &[443], Tcp),
    ];
    for &(scenario, tag, ports, proto) in cases {
        let p = policy(&[scenario], "eastus");
        let ip = first_v4(&tags, tag);
        for &port in ports {
            assert_eq!(
                verdict(&p, &ip, port, proto),
                Verdict::Allow,
                "{tag} {ip}:{port}/{proto:?}"
            );
        }
        assert_eq!(verdict(&p, &ip, 25, proto), Verdict::Deny, "{tag} {ip}:25");
    }
    // VirtualNetwork 443: private endpoints in the VNet, explicitly allowed guarded space.
    let p = policy(&["basic"], "eastus");
    assert_eq!(verdict(&p, "10.0.3.4", 443, Tcp), Verdict::Allow);
    assert_eq!(verdict(&p, "10.1.3.4", 443, Tcp), Verdict::Deny);
    // Inbound 44224 and in-cluster ports are documented, not egress.
    let k8s = policy(&["basic", "kubernetes"], "eastus");
    assert_eq!(
        verdict(&k8s, &first_v4(&tags, "AzureMachineLearning"), 44224, Tcp),
        Verdict::Deny
    );
    assert_eq!(verdict(&k8s, "10.0.3.4", 5001, Tcp), Verdict::Deny);
    let ports: Vec<u16> = k8s
        .rules()
        .iter()
        .filter(|r| r.name.starts_with("k8s-in-cluster"))
        .flat_map(|r| r.ports.iter().map(|p| p.0))
        .collect();
    assert_eq!(
        ports,
        vec![
            5001, 11001, 12001, 12101, 12201, 20000, 8000, 8001, 9001, 9999
        ]
    );
}

/// The published host lists (learn.microsoft.com, see tests/data headers): every
/// `host port` line is allowed with all scenarios on.
#[test]
fn published_host_lists_are_covered() {
    let p = policy(ALL, "westus2");
    let mut checked = 0;
    for file in [
        include_str!("data/hosts-aml-required.txt"),
        include_str!("data/hosts-aml-optional.txt"),
        include_str!("data/hosts-aml-kubernetes-extension.txt"),
    ] {
        for line in file
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (host, port) = line.split_once(' ').unwrap();
            let host = host
                .replace("*.", "x.")
                .replace("<region>", "westus2")
                .replace("<storage>", "mlstore")
                .replace("<acr>", "myacr")
                .replace("<workspace-id>", "1234abcd");
            let port: u16 = port.trim().parse().unwrap();
            assert_eq!(
                verdict(&p, &host, port, Protocol::Tcp),
                Verdict::Allow,
                "{line}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 75, "only {checked} lines checked");
}

/// The document's UDP rows (`<region>.tundra.azureml.ms` UDP 5831, and the
/// protocol-ANY rows on 443) name hosts, but no UDP datagram carries a name:
/// `explain` must not promise what the ruleset does not forward. Each is
/// denied with `needs_dns`, naming the rule of the right scenario; the
/// addresses are forwarded through the service-tag rule.
#[test]
fn seed_udp_rows_say_the_name_cannot_be_enforced() {
    let p = policy(&["basic"], "westus2");
    for (host, port, rule) in [
        ("westus2.tundra.azureml.ms", 5831, "compute-instance-tundra"),
        // today's document, not the seed (see the profile's header)
        (
            "x.tundra.westus2.api.azureml.ms",
            5831,
            "compute-instance-tundra",
        ),
        (
            "pool.westus2.batch.azure.com",
            443,
            "compute-instance-batch",
        ),
        (
            "pool.westus2.service.batch.azure.com",
            443,
            "compute-instance-batch",
        ),
    ] {
        let d = p.decide(&Dest {
            target: Target::parse(host),
            port,
            proto: Protocol::Udp,
        });
        let name = d.rule.map(|r| p.rule(r).name.as_str());
        assert_eq!(
            (d.verdict, d.reason, name),
            (Verdict::Deny, Reason::NeedsDns, Some(rule)),
            "{host}:{port}/udp"
        );
        assert_eq!(p.rule(d.rule.unwrap()).scenario.as_deref(), Some("basic"));
    }
    // The rendered ruleset drops UDP 443, and forwards UDP 5831 to the
    // AzureMachineLearning addresses: the address rule allows them.
    let tags = ServiceTags::parse("tags.json", TAGS).unwrap();
    let p = policy(&["basic"], "eastus");
    let ip = first_v4(&tags, "AzureMachineLearning");
    assert_eq!(verdict(&p, &ip, 5831, Protocol::Udp), Verdict::Allow);
    assert_eq!(verdict(&p, &ip, 443, Protocol::Udp), Verdict::Deny);
}

/// The registry is part of `basic` (custom images, job submission), the
/// AzureMonitor tag is not (only when Azure Monitor is not secured: the
/// `monitoring` scenario), and the inbound rule is its own scenario.
#[test]
fn scenarios_hold_what_the_document_makes_them_conditional_on() {
    let scenario_of = |name: &str| {
        let p = policy(ALL, "westus2");
        let r = p.rules().iter().find(|r| r.name == name).unwrap();
        r.scenario.clone().unwrap()
    };
    assert_eq!(scenario_of("container-registry"), "basic");
    assert_eq!(scenario_of("tag-azure-monitor"), "monitoring");
    assert_eq!(scenario_of("inbound-azure-machine-learning"), "public-ip");
    let basic = policy(&["basic"], "westus2");
    let tagged: Vec<&str> = basic
        .rules()
        .iter()
        .filter(|r| r.scenario.as_deref() == Some("basic"))
        .flat_map(|r| r.service_tags.iter().map(String::as_str))
        .collect();
    assert!(
        !tagged
            .iter()
            .any(|t| t.eq_ignore_ascii_case("AzureMonitor")),
        "{tagged:?}"
    );
    assert!(
        !basic
            .rules()
            .iter()
            .any(|r| r.scenario.as_deref() == Some("basic")
                && r.direction != portcullis::config::Direction::Egress),
        "basic holds no inbound rule"
    );
    // The document's assumptions and the other document's hosts are stated.
    let scenario = |name: &str| {
        basic
            .scenarios()
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .clone()
    };
    let notes = scenario("basic").notes.join(" ");
    for assumption in [
        "container registry that you provide",
        "private Python package repository",
        "private endpoints can communicate directly with each other within the VNet",
        "Azure Storage Account (blob, file, table, queue)",
    ] {
        assert!(
            notes.contains(assumption),
            "basic notes lack {assumption:?}: {notes}"
        );
    }
    let k8s = scenario("kubernetes");
    assert!(
        k8s.description.contains("outbound-rules-control-egress")
            && k8s.notes.join(" ").contains("k8s-cluster-extensions"),
        "{k8s:?}"
    );
}

/// Inbound 44224 is the public-ip scenario's: from AzureMachineLearning of
/// the region and its pair, to the VNet only (`to`), never an egress grant.
#[test]
fn public_ip_inbound_comes_from_the_regional_tags_to_the_vnet() {
    let public = policy(&["public-ip"], "eastus");
    let inbound = public
        .rules()
        .iter()
        .find(|r| r.name == "inbound-azure-machine-learning")
        .unwrap();
    assert_eq!(
        (
            inbound.state.clone(),
            inbound.ports.clone(),
            inbound.scenario.as_deref(),
            inbound.service_tags.clone(),
            inbound
                .to
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        ),
        (
            RuleState::NotEgress,
            vec![(44224, 44224)],
            Some("public-ip"),
            vec![
                "AzureMachineLearning.eastus".to_string(),
                "AzureMachineLearning.centralus".to_string()
            ],
            vec!["10.0.0.0/16".to_string()],
        )
    );
}

/// The seed document itself (tests/data/aml-network-doc-seed.txt, a copy of
/// the text the profile was transcribed from), scanned for every host name
/// and service tag it mentions: each is in a profile rule. A host or tag
/// dropped from the profile, or a document update adding one, fails here
/// without anyone maintaining a list.
#[test]
fn every_host_and_tag_the_document_mentions_is_in_the_profile() {
    let doc = include_str!("data/aml-network-doc-seed.txt")
        .replace("<your ACR name>", "<acr>")
        .replace("<your storage account name>", "<storage>")
        .replace("<your workspace ID>", "<workspace_id>");
    let profile: toml::Value = toml::from_str(include_str!("../src/policy/azureml.toml")).unwrap();
    let rules = profile["rule"].as_array().unwrap();
    let list = |r: &toml::Value, key: &str| -> Vec<String> {
        r.get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let hosts: Vec<String> = rules.iter().flat_map(|r| list(r, "hosts")).collect();
    let tags: Vec<String> = rules
        .iter()
        .flat_map(|r| list(r, "service_tags"))
        .map(|t| t.to_ascii_lowercase())
        .collect();
    let cidrs: Vec<String> = rules.iter().flat_map(|r| list(r, "cidrs")).collect();
    let tokens: Vec<&str> = doc
        .split(|c: char| !(c.is_ascii_alphanumeric() || ".*<>_-".contains(c)))
        .map(|t| t.trim_matches('.'))
        .filter(|t| !t.is_empty())
        .collect();
    let tlds = [".com", ".net", ".ms", ".io", ".org", ".dev"];
    let mut seen_hosts = 0;
    for t in tokens
        .iter()
        .filter(|t| tlds.iter().any(|d| t.ends_with(d)))
    {
        // "Required to access vscode.dev": the product's name in prose; the
        // table row is *.vscode.dev.
        if *t == "vscode.dev" {
            continue;
        }
        assert!(
            hosts.iter().any(|h| h == t),
            "host {t} of the document is in no profile rule"
        );
        seen_hosts += 1;
    }
    // Service tags: CamelCase words, or Word.Suffix; prose words excluded.
    let not_tags = [
        "AllowRStudioInstall", // the document's Azure Firewall rule name
        "AutoML",
        "FQDNs",
        "GitHub",
        "IPs",
        "IntelliSense",
        "Microsoft.MachineLearningServices", // in the API URL
        "PODs",
        "PyTorch",
        "RStudio",
        "URLs",
        "VNet",
    ];
    let aliases = [
        ("frontdoor.firstparty", "azurefrontdoor.firstparty"),
        ("keyvault.<region>", "azurekeyvault.<region>"),
    ];
    let mut seen_tags = 0;
    for t in tokens
        .iter()
        .filter(|t| is_tag_like(t) && !not_tags.contains(t))
    {
        seen_tags += 1;
        if *t == "VirtualNetwork" {
            assert!(
                cidrs.iter().any(|c| c == "<vnet>"),
                "VirtualNetwork: no <vnet> rule"
            );
            continue;
        }
        let lower = t.to_ascii_lowercase();
        let want = aliases
            .iter()
            .find(|(a, _)| *a == lower)
            .map_or(lower.as_str(), |(_, b)| b);
        assert!(
            tags.iter()
                .any(|g| g == want || g.starts_with(&format!("{want}."))),
            "service tag {t} of the document is in no profile rule"
        );
    }
    assert!(
        seen_hosts >= 70 && seen_tags >= 20,
        "{seen_hosts} hosts, {seen_tags} tags"
    );
}

/// `AzureMachineLearning`, `Storage.<region>`: an upper-case letter, letters
/// only, and either a second upper-case word or a `.suffix`.
fn is_tag_like(t: &str) -> bool {
    let (word, suffix) = t.split_once('.').map_or((t, None), |(w, s)| (w, Some(s)));
    let letters = word.chars().all(|c| c.is_ascii_alphabetic());
    let capital = word.starts_with(|c: char| c.is_ascii_uppercase());
    let humps = word.chars().skip(1).any(|c| c.is_ascii_uppercase())
        && word.chars().any(|c| c.is_ascii_lowercase());
    let suffix_ok = suffix.is_some_and(|s| {
        s == "<region>"
            || (s.starts_with(|c: char| c.is_ascii_uppercase())
                && s.chars().all(|c| c.is_ascii_alphabetic()))
    });
    letters && capital && (suffix_ok || (suffix.is_none() && humps))
}
