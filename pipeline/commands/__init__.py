"""One module per `hdpipe` command; each defines `command`, a click command that only wires."""
