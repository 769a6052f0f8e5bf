"""The shipped rule files (*.toml). Installed, this folder is the package `onnxfold_rules`."""
