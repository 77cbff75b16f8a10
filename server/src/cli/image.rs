//! `berth image pull|ls|rm|load|push|gc`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use berth_agent::reference::Reference;
use berth_agent::Engine;
use clap::Subcommand;

use super::{human_size, progress_printer, runtime};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pull an image from its registry.
    Pull {
        reference: String,
        /// Print only the image id.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List images.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove image references (then garbage-collect what nothing uses).
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Load an OCI image layout or docker-archive tarball (optionally gzip-compressed).
    Load {
        /// The tarball (`-` for standard input is not supported: give a file).
        #[arg(short, long)]
        input: PathBuf,
        /// Name the loaded image (when the tarball holds one image).
        #[arg(short, long)]
        tag: Option<String>,
    },
    /// Push a local image to a registry under a new reference.
    Push { image: String, destination: Option<String> },
    /// Remove layers and blobs no image or container uses.
    Gc,
}

pub fn run(engine: &Engine, cmd: Command) -> Result<i32> {
    let images = engine.images();
    match cmd {
        Command::Pull { reference, quiet } => {
            let r: Reference = reference.parse()?;
            let img = runtime().block_on(images.pull(&r, &progress_printer(quiet)))?;
            if quiet {
                println!("{}", img.id);
            } else {
                println!("pulled {} ({})", r, img.id);
            }
        }
        Command::Ls { json } => {
            let list = images.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<60} {:<14} {:>10}", "REFERENCE", "IMAGE ID", "SIZE");
                for img in &list {
                    let id = &img.id.hex()[..12];
                    if img.references.is_empty() {
                        println!("{:<60} {:<14} {:>10}", "<none>", id, human_size(img.size));
                    }
                    for r in &img.references {
                        println!("{:<60} {:<14} {:>10}", r, id, human_size(img.size));
                    }
                }
            }
        }
        Command::Rm { images: names } => {
            let mut failed = false;
            for name in names {
                match images.remove(&name) {
                    Ok(untagged) => {
                        for r in untagged {
                            println!("untagged {r}");
                        }
                    }
                    Err(e) => {
                        eprintln!("berth: {e}");
                        failed = true;
                    }
                }
            }
            let report = engine.gc()?;
            print_gc(&report);
            return Ok(if failed { 1 } else { 0 });
        }
        Command::Load { input, tag } => {
            let tag: Option<Reference> = tag.map(|t| t.parse()).transpose()?;
            let mut loaded =
                runtime().block_on(images.load(&input)).with_context(|| format!("loading {}", input.display()))?;
            if let Some(t) = &tag {
                match loaded.as_slice() {
                    [one] => loaded = vec![images.tag(&one.id.to_string(), t)?],
                    _ => anyhow::bail!("--tag names one image, but {} holds {}", input.display(), loaded.len()),
                }
            }
            for img in loaded {
                let names = if img.references.is_empty() { "<none>".to_string() } else { img.references.join(", ") };
                println!("loaded {} ({names})", img.id);
            }
        }
        Command::Push { image, destination } => {
            let dest: Reference = destination.as_deref().unwrap_or(&image).parse()?;
            runtime().block_on(images.push(&image, &dest))?;
            println!("pushed {dest}");
        }
        Command::Gc => print_gc(&engine.gc()?),
    }
    Ok(0)
}

fn print_gc(r: &berth_agent::image::GcReport) {
    if r.removed_layers + r.removed_blobs + r.removed_images > 0 {
        println!(
            "removed {} images, {} layers, {} blobs; freed {}",
            r.removed_images,
            r.removed_layers,
            r.removed_blobs,
            human_size(r.freed_bytes)
        );
    }
}
