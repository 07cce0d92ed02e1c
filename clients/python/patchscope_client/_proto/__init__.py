"""Generated from proto/patchscope/v1/patchscope.proto by `make proto` or the package build; do not edit."""
