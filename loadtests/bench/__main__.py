from loadtests.bench.run import main

main()
