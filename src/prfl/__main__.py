from prfl.cli import main

main()
