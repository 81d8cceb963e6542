from edge_rt.cli import main

main()
