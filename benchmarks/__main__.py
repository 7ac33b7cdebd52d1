from benchmarks import http

http.main()
