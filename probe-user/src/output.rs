//! Where request events go: JSON lines on stdout or in a file.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::Path,
};

use crate::event::RequestEvent;

pub struct JsonLines {
    out: BufWriter<Box<dyn Write + Send>>,
}

impl JsonLines {
    /// `-` is stdout; anything else a file, appended to.
    pub fn open(path: &str) -> io::Result<Self> {
        let inner: Box<dyn Write + Send> = if path == "-" {
            Box::new(io::stdout())
        } else {
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(Path::new(path))?,
            )
        };
        Ok(Self {
            out: BufWriter::new(inner),
        })
    }

    pub fn write(&mut self, event: &RequestEvent) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, event)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
