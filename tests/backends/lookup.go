// A pfrest lookup backend on Go's net/http, the server many backends are written on (it reads pipelined
// requests one after another and answers them in order): tests/test_pipelining.py builds and runs it.
//
//	lookup [-echo=false]
//
// It listens on 127.0.0.1, a port of the kernel's choosing, and prints "listening on HOST:PORT".
// GET /lookup?key=K answers 200 ["value-of-K"], or 404 for a key starting "missing"; /policy
// answers "OK policy-RECIPIENT" (the recipient from the form body, whatever the method: pfrest's policy
// requests are GET by default, whose body Go's FormValue does not read). With -echo (the default) every
// answer echoes X-Request-Id.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
)

func main() {
	echo := flag.Bool("echo", true, "echo X-Request-Id in every answer")
	flag.Parse()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listening on %s\n", listener.Addr())
	os.Stdout.Sync()
	handler := func(w http.ResponseWriter, r *http.Request) {
		if *echo {
			if id := r.Header.Get("X-Request-Id"); id != "" {
				w.Header().Set("X-Request-Id", id)
			}
		}
		if r.URL.Path == "/policy" {
			body, _ := io.ReadAll(r.Body)
			form, _ := url.ParseQuery(string(body))
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprintf(w, "OK policy-%s", form.Get("recipient"))
			return
		}
		key := r.URL.Query().Get("key")
		if strings.HasPrefix(key, "missing") {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		body, _ := json.Marshal([]string{"value-of-" + key})
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	}
	fmt.Fprintln(os.Stderr, http.Serve(listener, http.HandlerFunc(handler)))
	os.Exit(1)
}
