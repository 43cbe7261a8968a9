package api

import (
	"net/http"

	"github.com/growserver/grow/internal/jobs"
	"github.com/growserver/grow/internal/store"
)

func (a *API) routeImages() {
	a.handle("GET /v1/images", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		ims, err := a.st.ListImages(r.Context())
		if err != nil {
			return err
		}
		return paginate(w, r, ims, func(im store.Image) string { return im.Name })
	})
	a.handle("GET /v1/images/{id}", false, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		im, err := a.st.GetImage(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, im)
		return nil
	})
	// POST /v1/images?name=N&format=raw|qcow2[&kernel=&initrd=&cmdline=&storage=] with the
	// image bytes as the body (Content-Length required).
	a.handle("POST /v1/images", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		q := r.URL.Query()
		if r.ContentLength <= 0 {
			return invalid("Send the image as the request body with a Content-Length")
		}
		req := jobs.ImportImageRequest{Name: q.Get("name"), Format: q.Get("format"), Size: r.ContentLength, Storage: q.Get("storage"),
			Kernel: q.Get("kernel"), Initrd: q.Get("initrd"), Cmdline: q.Get("cmdline")}
		if req.Format == "" {
			req.Format = "raw"
		}
		im, err := a.jobs.ImportImage(r.Context(), req, r.Body, nil)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusCreated, im)
		return nil
	})
	a.handle("DELETE /v1/images/{id}", true, func(w http.ResponseWriter, r *http.Request, u store.User) error {
		im, err := a.st.GetImage(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		if err := a.jobs.DeleteImage(r.Context(), im); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}
