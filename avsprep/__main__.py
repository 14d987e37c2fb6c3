from avsprep.cli import main

main()
