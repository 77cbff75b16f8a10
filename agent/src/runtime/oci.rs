//! Turning a container [`Spec`](crate::container::Spec) into the OCI runtime spec youki runs:
//! Docker's defaults (capabilities, seccomp, masked and read-only paths, mounts), the image
//! config, the resource limits and the network namespace the shim prepared.

use std::path::Path;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder,
    ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use super::seccomp;
use super::user::User;
use crate::container::{Paths, Spec as ContainerSpec};

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

#[derive(Debug, thiserror::Error)]
#[error("building the OCI spec: {0}")]
pub struct Error(String);

fn e(err: impl std::fmt::Display) -> Error {
    Error(err.to_string())
}

pub fn cgroups_path(id: &str) -> String {
    format!("/berth/{id}")
}

fn bind(src: &Path, dest: &str, ro: bool) -> Result<Mount, Error> {
    let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
    if ro {
        options.push("ro".into());
    }
    MountBuilder::default().destination(dest).typ("bind").source(src).options(options).build().map_err(e)
}

pub fn build(spec: &ContainerSpec, paths: &Paths, user: &User, netns: &Path, cgroup_v2: bool) -> Result<Spec, Error> {
    let caps: std::collections::HashSet<Capability> = DEFAULT_CAPS.iter().copied().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(std::collections::HashSet::new())
        .ambient(std::collections::HashSet::new())
        .build()
        .map_err(e)?;
    let mut env = spec.env.clone();
    if !env.iter().any(|v| v.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    if !env.iter().any(|v| v.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", spec.hostname));
    }
    let mut process = ProcessBuilder::default()
        .terminal(false)
        .args(spec.args.clone())
        .env(env)
        .cwd(if spec.working_dir.is_empty() { "/".to_string() } else { spec.working_dir.clone() })
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .additional_gids(user.additional_gids.clone())
                .build()
                .map_err(e)?,
        )
        .capabilities(capabilities)
        .build()
        .map_err(e)?;
    // youki loads the seccomp filter before dropping capabilities only when the field is absent
    // (it tests `is_none()`, not the value): `Some(false)` would make the late load fail with
    // EPERM. So the field is set only when the bit is wanted.
    process.set_no_new_privileges(spec.no_new_privileges.then_some(true));

    let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts();
    if cgroup_v2 {
        for m in mounts.iter_mut() {
            if m.destination() == Path::new("/sys/fs/cgroup") {
                m.set_typ(Some("cgroup2".into())).set_source(Some("cgroup".into()));
            }
        }
    }
    mounts.push(bind(&paths.dir.join("hosts"), "/etc/hosts", false)?);
    mounts.push(bind(&paths.dir.join("hostname"), "/etc/hostname", false)?);
    mounts.push(bind(&paths.dir.join("resolv.conf"), "/etc/resolv.conf", false)?);
    // The user's bind mounts last (so one over /etc hides the files above rather than getting
    // them written into the host directory), parents before children, as Docker orders them.
    let mut user_mounts: Vec<&crate::container::Mount> = spec.mounts.iter().collect();
    user_mounts.sort_by_key(|m| m.destination.matches('/').count());
    for m in user_mounts {
        mounts.push(bind(&m.source, &m.destination, m.read_only)?);
    }

    let ns = |t: LinuxNamespaceType| -> LinuxNamespace {
        LinuxNamespaceBuilder::default().typ(t).build().expect("namespace")
    };
    let mut namespaces = vec![
        ns(LinuxNamespaceType::Pid),
        ns(LinuxNamespaceType::Ipc),
        ns(LinuxNamespaceType::Uts),
        ns(LinuxNamespaceType::Mount),
        LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).path(netns).build().map_err(e)?,
    ];
    if cgroup_v2 {
        namespaces.push(ns(LinuxNamespaceType::Cgroup));
    }

    let mut resources = LinuxResourcesBuilder::default();
    if let Some(limit) = spec.memory {
        resources = resources.memory(LinuxMemoryBuilder::default().limit(limit as i64).build().map_err(e)?);
    }
    if let Some(cpus) = spec.cpus {
        let period: u64 = 100_000;
        resources = resources
            .cpu(LinuxCpuBuilder::default().period(period).quota((cpus * period as f64) as i64).build().map_err(e)?);
    }
    if let Some(pids) = spec.pids {
        resources = resources.pids(LinuxPidsBuilder::default().limit(pids).build().map_err(e)?);
    }

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(cgroups_path(&spec.id))
        .resources(resources.build().map_err(e)?)
        .masked_paths(oci_spec::runtime::get_default_maskedpaths())
        .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
        .seccomp(seccomp::default_profile())
        .build()
        .map_err(e)?;

    let mut out = Spec::default();
    out.set_hostname(Some(spec.hostname.clone()))
        .set_process(Some(process))
        .set_root(Some(RootBuilder::default().path(paths.rootfs()).readonly(false).build().map_err(e)?))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux))
        .set_annotations(None);
    Ok(out)
}
