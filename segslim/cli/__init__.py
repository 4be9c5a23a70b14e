"""The command-line layer: the shared flags, one (parser, workflow) pair per command, what each
command does once its flags are parsed, and auto-quant, which runs the commands as steps."""
