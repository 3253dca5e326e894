#![no_std]
// Present so the crate has a library target, as in aya-template.
