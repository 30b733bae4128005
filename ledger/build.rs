//! Debian's RocksDB is linked as a static archive (`ROCKSDB_STATIC`, set in
//! `.cargo/config.toml`; see ARCHITECTURE.md, "RocksDB"). `librocksdb-sys` then names only
//! the archive, so the compression libraries its objects call are named here, in the crate
//! every binary that opens a RocksDB depends on.
fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    if std::env::var_os("ROCKSDB_STATIC").is_some() {
        for lib in ["snappy", "lz4", "zstd", "z", "bz2"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
}
