fn main() {
    eprintln!("portcullis-bench: not built yet");
    std::process::exit(2);
}
