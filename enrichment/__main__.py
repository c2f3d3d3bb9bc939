from enrichment.cli import main

main()
