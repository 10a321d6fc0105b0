from tickpipe.cli import main

main(prog_name="tickpipe")
