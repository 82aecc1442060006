"""The command line (`ligerfx demo | dump | patterns`), the demo and its example model, and the
offline GPU compile used by the CI and the GPU check."""
