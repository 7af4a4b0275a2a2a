"""The subcommands of the `compressor` command, one module each (compress, report, bench,
load, serve): ``add_parser(commands, common)`` declares its flags and handler, the handler
checks them and calls the Python API. `compressor.cli` builds the parser from them and runs
the chosen one.

May import: the layers below it (`pipeline`, `sources`, `report`, `training`, `runtime`,
`models`, `stage` and the contracts); nothing imports it but `compressor.cli`.
"""
